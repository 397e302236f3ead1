//! Framing of the PostgreSQL wire protocol (v3).
//!
//! Frames stay raw `Bytes`; typed views are parsed on demand by [`super::messages`]. A length
//! field below 4 or above the configured maximum is rejected before anything is buffered or
//! forwarded, and "need more bytes" is distinct from "invalid".

use bytes::{Buf, Bytes, BytesMut};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message length {0} is below the minimum of 4")]
    TooShort(i64),
    #[error("message length {len} exceeds the maximum of {max} bytes")]
    TooLong { len: i64, max: usize },
}

/// A typed message: one tag byte, then a length that counts itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The whole frame as on the wire (tag, length, body).
    pub raw: Bytes,
}

impl Frame {
    /// The body after the tag and length.
    pub fn body(&self) -> Bytes {
        self.raw.slice(5..)
    }
}

fn check_len(len: i32, max: usize) -> Result<usize, FrameError> {
    if len < 4 {
        return Err(FrameError::TooShort(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLong {
            len: len as i64,
            max,
        });
    }
    Ok(len)
}

/// Splits one typed message off the front of `buf`. `Ok(None)` means more bytes are needed.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len = check_len(len, max)?;
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(len + 1).freeze();
    Ok(Some(Frame { tag: raw[0], raw }))
}

/// Splits one untyped startup-phase packet (length, then body) off the front of `buf`.
/// Returns the body without the length.
pub fn split_startup(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    // A startup packet holds at least its protocol code.
    if len < 8 {
        return Err(FrameError::TooShort(len as i64));
    }
    let len = check_len(len, max)?;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    Ok(Some(packet.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_only_when_complete() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x0bSELECT"[..]);
        assert_eq!(split_frame(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(b"\0X");
        let f = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body()[..], b"SELECT\0");
        assert_eq!(&buf[..], b"X");
    }

    #[test]
    fn bad_lengths_are_refused_before_buffering() {
        let mut short = BytesMut::from(&b"Q\0\0\0\x03"[..]);
        assert_eq!(split_frame(&mut short, 1024), Err(FrameError::TooShort(3)));
        let mut negative = BytesMut::from(&b"Q\xff\xff\xff\xff"[..]);
        assert_eq!(
            split_frame(&mut negative, 1024),
            Err(FrameError::TooShort(-1))
        );
        let mut long = BytesMut::from(&b"Q\0\x10\0\0"[..]);
        assert!(matches!(
            split_frame(&mut long, 1024),
            Err(FrameError::TooLong { .. })
        ));
        // A declared length over the maximum reserves nothing (a client could declare 1 GiB).
        let mut declared = BytesMut::with_capacity(16);
        declared.extend_from_slice(b"p\x03\xc0\0\0");
        assert!(matches!(
            split_frame(&mut declared, 1024),
            Err(FrameError::TooLong { .. })
        ));
        assert!(declared.capacity() < 1024);
        let mut startup = BytesMut::from(&b"\0\0\0\x04"[..]);
        assert_eq!(
            split_startup(&mut startup, 1024),
            Err(FrameError::TooShort(4))
        );
    }

    #[test]
    fn startup_packets_split() {
        let mut buf = BytesMut::from(&b"\0\0\0\x08\x04\xd2\x16\x2fmore"[..]);
        let body = split_startup(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&body[..], &[0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(&buf[..], b"more");
    }
}
