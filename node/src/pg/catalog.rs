//! Table and column names behind the table OIDs of RowDescription, for column masking rules.
//!
//! PostgreSQL reports, for a result column that is a plain column reference, the table's OID
//! and the column's number, even under an alias (`SELECT ssn AS x`). The gateway resolves them
//! over a connection of its own to the target, with the gateway's login, and caches them.

use super::backend::{Backend, BackendError, Target};
use super::codec::split_frame;
use super::messages;
use crate::core::tls::send_all;
use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;

/// A table's schema, name and columns by number, and the tables it is a partition or an
/// inheritance child of (nearest first), whose column rules cover its columns of the same name.
#[derive(Debug, Default)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub columns: HashMap<i16, String>,
    pub ancestors: Vec<(String, String)>,
}

pub struct Catalog {
    target: Arc<Target>,
    /// How long a lookup may take (`postgres.catalog_timeout_secs`): the connection is shared
    /// by the target's masked sessions, which wait for it meanwhile.
    timeout: std::time::Duration,
    conn: Mutex<Option<Backend>>,
    cache: moka::sync::Cache<u32, Arc<TableInfo>>,
}

impl Catalog {
    pub fn new(target: Arc<Target>, timeout: std::time::Duration) -> Self {
        Self {
            target,
            timeout,
            conn: Mutex::new(None),
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(std::time::Duration::from_secs(300))
                .build(),
        }
    }

    /// Resolves the tables of the given columns (table OID, column number). A table the cache
    /// holds without one of the columns (added since) is looked up again; tables the target
    /// does not know to the gateway's own connection (dropped, or created in a client's
    /// transaction not yet committed) are absent from the result.
    pub async fn tables(
        &self,
        columns: &[(u32, i16)],
    ) -> Result<HashMap<u32, Arc<TableInfo>>, BackendError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for &(oid, column) in columns {
            if oid == 0 || missing.contains(&oid) {
                continue;
            }
            match self.cache.get(&oid) {
                Some(t) if t.columns.contains_key(&column) => {
                    out.insert(oid, t);
                }
                _ => {
                    out.remove(&oid);
                    missing.push(oid);
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let mut conn = self.conn.lock().await;
        let result = tokio::time::timeout(self.timeout, self.query(&mut conn, &missing))
            .await
            .unwrap_or(Err(BackendError::LookupTimeout(self.timeout.as_secs())));
        if result.is_err() {
            // Start over with a fresh connection next time.
            *conn = None;
        }
        for (oid, info) in result? {
            let info = Arc::new(info);
            self.cache.insert(oid, info.clone());
            out.insert(oid, info);
        }
        Ok(out)
    }

    async fn query(
        &self,
        conn: &mut Option<Backend>,
        oids: &[u32],
    ) -> Result<HashMap<u32, TableInfo>, BackendError> {
        if conn.is_none() {
            *conn = Some(
                self.target
                    .connect(&[("application_name", "vigil-catalog")])
                    .await?,
            );
        }
        let backend = conn.as_mut().expect("just connected");
        let list = oids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // Two result sets: the columns (five values a row), then the ancestors (three).
        let sql = format!(
            "SELECT c.oid::text, n.nspname, c.relname, a.attnum::text, a.attname \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
             WHERE a.attnum > 0 AND c.oid IN ({list}); \
             WITH RECURSIVE up(child, parent, depth) AS ( \
               SELECT inhrelid, inhparent, 1 FROM pg_catalog.pg_inherits WHERE inhrelid IN ({list}) \
               UNION ALL SELECT up.child, i.inhparent, up.depth + 1 \
               FROM up JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.parent WHERE up.depth < 32) \
             SELECT up.child::text, n.nspname, c.relname FROM up \
             JOIN pg_catalog.pg_class c ON c.oid = up.parent \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY up.child, up.depth"
        );
        let mut q = BytesMut::new();
        q.put_u8(b'Q');
        q.put_i32((sql.len() + 5) as i32);
        q.put_slice(sql.as_bytes());
        q.put_u8(0);
        send_all(&mut backend.stream, &q)
            .await
            .map_err(BackendError::Connect)?;
        let mut out: HashMap<u32, TableInfo> = HashMap::new();
        let buf = &mut backend.leftover;
        loop {
            let frame = match split_frame(buf, super::backend::MAX_BACKEND_FRAME)? {
                Some(f) => f,
                None => {
                    if backend
                        .stream
                        .read_buf(buf)
                        .await
                        .map_err(BackendError::Connect)?
                        == 0
                    {
                        return Err(BackendError::Closed);
                    }
                    continue;
                }
            };
            match frame.tag {
                b'D' => {
                    let body = frame.body();
                    let v = messages::parse_data_row(&body)?;
                    let text = |i: usize| {
                        v.get(i)
                            .copied()
                            .flatten()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .unwrap_or_default()
                    };
                    if v.len() == 3 {
                        let child = text(0).parse::<u32>().ok();
                        if let Some(t) = child.and_then(|o| out.get_mut(&o)) {
                            t.ancestors.push((text(1), text(2)));
                        }
                        continue;
                    }
                    let (Ok(oid), Ok(attnum)) = (text(0).parse::<u32>(), text(3).parse::<i16>())
                    else {
                        continue;
                    };
                    let t = out.entry(oid).or_insert_with(|| TableInfo {
                        schema: text(1),
                        name: text(2),
                        columns: HashMap::new(),
                        ancestors: Vec::new(),
                    });
                    t.columns.insert(attnum, text(4));
                }
                b'E' => {
                    let (code, message) = messages::parse_error_fields(&frame.body());
                    return Err(BackendError::Refused { code, message });
                }
                b'Z' => return Ok(out),
                _ => {}
            }
        }
    }
}
