//! What an approval is bound to, and what the approver is shown.
//!
//! An approval lets one statement run: the statement that will actually execute, resolved at
//! the moment it is held, with everything that changes what it does. The binding covers:
//!
//! - the protocol (`simple` or `extended`) and the exact text;
//! - for each prepared statement the text runs by name (SQL `EXECUTE name`), that name and the
//!   text the target holds under it;
//! - for each bind parameter: NULL or its exact bytes, its format (text or binary) and the type
//!   the client declared at Parse (0 when the server infers it from the text);
//! - the session's database, role (`current_user`) and `search_path`, and every other setting
//!   the session, its client or `ALTER ROLE`/`ALTER DATABASE` changed from the server's
//!   (`transform_null_equals`, `DateStyle`, `session_replication_role` …), as the target
//!   reports them just before the statement runs ([`CustomSettings::probe`]); and the custom
//!   settings (`app.tenant`, which row-level security policies read) that the session may have
//!   given a value: PostgreSQL lists none of them, so the gateway names those it saw set
//!   ([`CustomSettings`]) and those `ALTER ROLE`/`ALTER DATABASE` set.
//!
//! The statement hash is SHA-256 over all of it; an approval is consumed only by a statement
//! whose hash is equal. The approver is shown every part, values masked so that the statement
//! reads as it will run ([`crate::policy::masking::mask_statement`]).

use crate::policy::masking::{mask_statement, Counts, Masker, Unfaithful};
use sha2::{Digest, Sha256};
use vigil_proto::coordinator as pb;
use vigil_proto::record::{self, PreparedText};

/// The start of what the gateway asks the target, in the session, right before a held
/// statement: the settings that decide what its names mean and what it may do (see
/// [`CustomSettings::probe`]). Functions and operators are named with their schema, so that
/// functions or operators of those names in a schema on the `search_path` ahead of
/// `pg_catalog` are not what answers (`current_user` is a keyword, not a function name). The
/// fourth column lists, `name='value'` sorted by name (the value quoted as a SQL literal, so
/// that a value holding `; other=…` cannot read as two settings):
///
/// - every setting whose value comes from the client, the session, the role or the database,
///   but those shown apart (`search_path`, `role`, `session_authorization`) and those that
///   change no statement's meaning (`application_name`, `extra_float_digits`, and
///   `client_encoding` and `standard_conforming_strings`, which the gateway holds at UTF8 and
///   on);
/// - every custom setting (a name with a dot that no loaded module defines, so PostgreSQL does
///   not list it) that has a value and is named by `ALTER ROLE`/`ALTER DATABASE … SET` for
///   this session's login and database, or in the array that [`PROBE_END`] closes (the names
///   the session was seen to set).
pub const PROBE_START: &str = "SELECT pg_catalog.current_database(), current_user, \
pg_catalog.current_setting('search_path'), \
(SELECT pg_catalog.string_agg(name OPERATOR(pg_catalog.||) '=' OPERATOR(pg_catalog.||) pg_catalog.quote_literal(setting), '; ' ORDER BY name) FROM (\
SELECT name, setting FROM pg_catalog.pg_settings \
WHERE source OPERATOR(pg_catalog.=) ANY (ARRAY['client', 'session', 'user', 'database', 'database user']) \
AND NOT name OPERATOR(pg_catalog.=) ANY (ARRAY['search_path', 'role', 'session_authorization', 'application_name', 'client_encoding', 'standard_conforming_strings', 'extra_float_digits']) \
UNION \
SELECT c.name, c.setting FROM (SELECT c.name, \
CASE WHEN pg_catalog.strpos(c.name, '.') OPERATOR(pg_catalog.>) 0 THEN pg_catalog.current_setting(c.name, true) END AS setting FROM (\
SELECT pg_catalog.lower(pg_catalog.split_part(setting, '=', 1)) \
FROM pg_catalog.pg_db_role_setting, pg_catalog.unnest(setconfig) AS setting \
WHERE setdatabase OPERATOR(pg_catalog.=) ANY (ARRAY[0, (SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())]::pg_catalog.oid[]) \
AND setrole OPERATOR(pg_catalog.=) ANY (ARRAY[0, (SELECT oid FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) session_user)]::pg_catalog.oid[]) \
UNION SELECT pg_catalog.unnest(";

/// The end of the probe, after the array of the custom settings' names the session set.
pub const PROBE_END: &str = "::pg_catalog.text[])) AS c(name)) AS c \
WHERE c.setting IS NOT NULL \
AND NOT EXISTS (SELECT FROM pg_catalog.pg_settings p WHERE p.name OPERATOR(pg_catalog.=) c.name)\
) AS s)";

/// Whether `text` is the gateway's settings probe (for readers of the target's log).
pub fn is_probe(text: &str) -> bool {
    text.starts_with(PROBE_START) && text.ends_with(PROBE_END)
}

/// A session may name at most this many custom settings, of at most this many bytes in all;
/// past them, statements are not held (the gateway could not bind their values).
pub const MAX_CUSTOM_SETTINGS: usize = 256;
pub const MAX_CUSTOM_SETTINGS_BYTES: usize = 16 * 1024;

/// The custom settings (`app.tenant`) a session was seen to give a value: by `SET`, `SET
/// LOCAL`, `RESET`, `set_config` with a constant name (in the statement or in SQL text it
/// carries as a constant), or at startup (`options`, when `policy.allowed_startup_settings`
/// lets one through). PostgreSQL lists none of them, so the probe asks for each by name.
/// One set by a name built at run time, or inside a function, is not seen.
#[derive(Debug, Default)]
pub struct CustomSettings {
    names: std::collections::BTreeSet<String>,
    bytes: usize,
    /// More names than [`MAX_CUSTOM_SETTINGS`] (or [`MAX_CUSTOM_SETTINGS_BYTES`]) were set.
    overflow: bool,
}

impl CustomSettings {
    /// Notes names set (those without a dot are not custom; names PostgreSQL would not take
    /// as custom ones cannot have been set, and are left out).
    pub fn note<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            let name = name.to_ascii_lowercase();
            let valid = name.contains('.')
                && name.split('.').all(|part| !part.is_empty())
                && name.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.') || !c.is_ascii()
                });
            if !valid || self.names.contains(&name) {
                continue;
            }
            if self.names.len() == MAX_CUSTOM_SETTINGS
                || self.bytes + name.len() > MAX_CUSTOM_SETTINGS_BYTES
            {
                self.overflow = true;
                return;
            }
            self.bytes += name.len();
            self.names.insert(name);
        }
    }

    /// The probe for this session: [`PROBE_START`], the names as a SQL array, [`PROBE_END`].
    /// `Err` when the session set more custom settings than the gateway binds.
    pub fn probe(&self) -> Result<String, String> {
        if self.overflow {
            return Err(format!(
                "the session set more than {MAX_CUSTOM_SETTINGS} custom settings (or {MAX_CUSTOM_SETTINGS_BYTES} bytes of their names), whose values the gateway cannot all bind"
            ));
        }
        // A name is letters, digits, `_`, `$`, dots and non-ASCII characters ([`Self::note`]):
        // it needs no escaping inside quotes.
        let names: Vec<String> = self.names.iter().map(|n| format!("'{n}'")).collect();
        Ok(format!(
            "{PROBE_START}ARRAY[{}]{PROBE_END}",
            names.join(", ")
        ))
    }
}

/// The approver's copy may be at most this large (text, prepared texts and parameters).
pub const MAX_SHOWN: usize = 2 * 1024 * 1024;

/// The session settings an approval binds, as the target reported them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub database: String,
    pub role: String,
    pub search_path: String,
    /// The other settings that differ from the server's, and the custom ones (see
    /// [`PROBE_START`]), `name='value'; …`.
    pub others: String,
}

impl Settings {
    /// From the probe's row (four text values, the last NULL when no other setting differs).
    pub fn from_row(values: &[Option<&[u8]>]) -> Option<Self> {
        let text = |i: usize| -> Option<String> {
            let v = (*values.get(i)?)?;
            std::str::from_utf8(v).ok().map(str::to_string)
        };
        (values.len() == 4).then_some(())?;
        Some(Self {
            database: text(0)?,
            role: text(1)?,
            search_path: text(2)?,
            others: match values[3] {
                None => String::new(),
                Some(_) => text(3)?,
            },
        })
    }
}

/// A bind parameter as bound: NULL or its bytes, its format and declared type.
pub struct Param<'a> {
    pub value: Option<&'a [u8]>,
    pub binary: bool,
    pub type_oid: u32,
}

/// A digest over bind parameters, for a portal to carry until its Execute.
pub fn params_digest(params: &[Param<'_>]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((params.len() as u64).to_be_bytes());
    for p in params {
        h.update([u8::from(p.binary)]);
        h.update(p.type_oid.to_be_bytes());
        match p.value {
            None => h.update([0]),
            Some(v) => {
                h.update([1]);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
        }
    }
    h.finalize().into()
}

/// A held statement's binding.
pub struct Binding<'a> {
    pub mode: &'a str,
    pub text: &'a str,
    pub runs: &'a [PreparedText],
    /// Display values (as the audit record renders them), formats and declared types.
    pub params: Vec<(Option<String>, bool, u32)>,
    /// [`params_digest`] over the exact bytes (extended protocol only).
    pub params_digest: Option<[u8; 32]>,
    pub settings: Settings,
}

impl Binding<'_> {
    /// The statement hash an approval carries.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut part = |p: &[u8]| {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        };
        part(b"vigil approval binding v3");
        part(self.mode.as_bytes());
        part(self.text.as_bytes());
        part(&(self.runs.len() as u64).to_be_bytes());
        for r in self.runs {
            part(r.name.as_bytes());
            part(r.text.as_bytes());
        }
        part(self.params_digest.as_ref().map_or(&[][..], |d| &d[..]));
        part(self.settings.database.as_bytes());
        part(self.settings.role.as_bytes());
        part(self.settings.search_path.as_bytes());
        part(self.settings.others.as_bytes());
        hex::encode(h.finalize())
    }

    /// What the audit record says the approval binds.
    pub fn record(&self, hash: &str) -> record::Binding {
        record::Binding {
            database: self.settings.database.clone(),
            role: self.settings.role.clone(),
            search_path: self.settings.search_path.clone(),
            settings: self.settings.others.clone(),
            params: self
                .params
                .iter()
                .map(|(_, binary, type_oid)| record::ParamType {
                    format: if *binary { "binary" } else { "text" }.into(),
                    type_oid: *type_oid,
                })
                .collect(),
            hash: hash.to_string(),
        }
    }

    /// The approver's copy: every part, values masked without changing how the statement
    /// reads; an error when that cannot be done or the copy is too large to send.
    pub fn shown(
        &self,
        masker: &Masker,
        counts: &mut Counts,
    ) -> Result<pb::StatementBinding, Unfaithful> {
        let text = mask_statement(masker, self.text, counts)?;
        let runs = self
            .runs
            .iter()
            .map(|r| {
                Ok(pb::PreparedStatement {
                    name: masker.mask(&r.name, None, false, Some(counts)).into_owned(),
                    text: mask_statement(masker, &r.text, counts)?,
                })
            })
            .collect::<Result<Vec<_>, Unfaithful>>()?;
        let params: Vec<pb::Parameter> = self
            .params
            .iter()
            .map(|(value, binary, type_oid)| pb::Parameter {
                null: value.is_none(),
                value: value
                    .as_deref()
                    .map(|v| {
                        super::messages::mask_shown(masker, v, None, Some(counts)).into_owned()
                    })
                    .unwrap_or_default(),
                binary: *binary,
                type_oid: *type_oid,
            })
            .collect();
        let size = text.len()
            + runs.iter().map(|r| r.text.len()).sum::<usize>()
            + params.iter().map(|p| p.value.len()).sum::<usize>();
        if size > MAX_SHOWN {
            return Err(Unfaithful(format!(
                "the statement and its parameters ({size} bytes) are too large to show an approver (at most {MAX_SHOWN})"
            )));
        }
        let mut mask = |v: &str| masker.mask(v, None, false, Some(counts)).into_owned();
        Ok(pb::StatementBinding {
            mode: self.mode.to_string(),
            text,
            runs,
            params,
            database: mask(&self.settings.database),
            role: mask(&self.settings.role),
            search_path: mask(&self.settings.search_path),
            settings: mask(&self.settings.others),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding<'a>(params: &'a [Param<'a>], settings: Settings) -> Binding<'a> {
        Binding {
            mode: "extended",
            text: "UPDATE t SET a = $1 WHERE id = 1",
            runs: &[],
            params: Vec::new(),
            params_digest: Some(params_digest(params)),
            settings,
        }
    }

    fn settings(search_path: &str) -> Settings {
        Settings {
            database: "app".into(),
            role: "gw".into(),
            search_path: search_path.into(),
            others: "DateStyle='ISO, MDY'".into(),
        }
    }

    #[test]
    fn every_part_changes_the_hash() {
        let text = Param {
            value: Some(b"1234"),
            binary: false,
            type_oid: 0,
        };
        let base = binding(std::slice::from_ref(&text), settings("public")).hash();
        let variants = [
            // The same digits, sent as binary int4: another value.
            binding(
                &[Param {
                    value: Some(&1234i32.to_be_bytes()),
                    binary: true,
                    type_oid: 23,
                }],
                settings("public"),
            )
            .hash(),
            binding(
                &[Param {
                    value: Some(b"1234"),
                    binary: false,
                    type_oid: 25,
                }],
                settings("public"),
            )
            .hash(),
            binding(
                &[Param {
                    value: None,
                    binary: false,
                    type_oid: 0,
                }],
                settings("public"),
            )
            .hash(),
            binding(std::slice::from_ref(&text), settings("other, public")).hash(),
            binding(
                std::slice::from_ref(&text),
                Settings {
                    role: "admin".into(),
                    ..settings("public")
                },
            )
            .hash(),
            binding(
                std::slice::from_ref(&text),
                Settings {
                    others: "DateStyle='ISO, MDY'; transform_null_equals='on'".into(),
                    ..settings("public")
                },
            )
            .hash(),
        ];
        for v in &variants {
            assert_ne!(v, &base);
        }
        assert_eq!(
            binding(std::slice::from_ref(&text), settings("public")).hash(),
            base
        );
    }

    #[test]
    fn settings_come_from_a_four_column_row() {
        let row: [Option<&[u8]>; 4] = [
            Some(b"app"),
            Some(b"gw"),
            Some(b"\"$user\", public"),
            Some(b"TimeZone=UTC"),
        ];
        assert_eq!(
            Settings::from_row(&row),
            Some(Settings {
                database: "app".into(),
                role: "gw".into(),
                search_path: "\"$user\", public".into(),
                others: "TimeZone=UTC".into(),
            })
        );
        let none = [row[0], row[1], row[2], None];
        assert_eq!(Settings::from_row(&none).unwrap().others, "");
        assert_eq!(Settings::from_row(&row[..3]), None);
        assert_eq!(
            Settings::from_row(&[None, Some(b"gw"), Some(b"x"), None]),
            None
        );
    }

    #[test]
    fn custom_settings_are_asked_for_by_name() {
        let mut c = CustomSettings::default();
        assert!(is_probe(&c.probe().unwrap()));
        assert!(c
            .probe()
            .unwrap()
            .contains("unnest(ARRAY[]::pg_catalog.text[])"));
        c.note([
            "App.Tenant",
            "app.tenant",
            "search_path",
            "x.y'); DROP TABLE t; --",
            "a..b",
            ".a",
            "jwt.claims.sub$1",
            "é.ü",
        ]);
        let probe = c.probe().unwrap();
        assert!(is_probe(&probe));
        assert!(
            probe.contains(
                "unnest(ARRAY['app.tenant', 'jwt.claims.sub$1', 'é.ü']::pg_catalog.text[])"
            ),
            "{probe}"
        );
        // Past the limit nothing is held: a probe that left names out would bind too little.
        let more: Vec<String> = (0..MAX_CUSTOM_SETTINGS)
            .map(|i| format!("n.v{i}"))
            .collect();
        c.note(more.iter().map(String::as_str));
        assert!(c.probe().is_err());
    }
}
