//! Which principals a list admits: the one matcher behind a connection's `allow` and a policy
//! rule's `principals`.

use serde::{Deserialize, Serialize};
use vigil_proto::record::Principal;

/// A principal matches when it is on any list: its subject, its client id, one of its groups,
/// its model; or when `any_authenticated` admits every verified principal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalMatch {
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub client_ids: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The `model` the token declares.
    #[serde(default)]
    pub models: Vec<String>,
    /// Every verified principal matches.
    #[serde(default)]
    pub any_authenticated: bool,
}

impl PrincipalMatch {
    /// Whether it names no one (all lists empty, and not `any_authenticated`).
    pub fn is_empty(&self) -> bool {
        !self.any_authenticated
            && self.subjects.is_empty()
            && self.client_ids.is_empty()
            && self.groups.is_empty()
            && self.models.is_empty()
    }

    /// Whether the principal is on a list (or every principal is admitted).
    pub fn admits(&self, p: &Principal) -> bool {
        self.any_authenticated
            || self.subjects.contains(&p.subject)
            || p.client_id
                .as_ref()
                .is_some_and(|c| self.client_ids.contains(c))
            || p.groups.iter().any(|g| self.groups.contains(g))
            || p.model.as_ref().is_some_and(|m| self.models.contains(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_matches_on_any_list() {
        let p = Principal {
            subject: "s".into(),
            client_id: Some("c".into()),
            groups: vec!["g".into()],
            model: Some("m".into()),
            ..Default::default()
        };
        let with = |f: fn(&mut PrincipalMatch)| {
            let mut r = PrincipalMatch::default();
            f(&mut r);
            r
        };
        assert!(PrincipalMatch::default().is_empty());
        assert!(!PrincipalMatch::default().admits(&p));
        assert!(with(|r| r.subjects = vec!["s".into()]).admits(&p));
        assert!(with(|r| r.client_ids = vec!["c".into()]).admits(&p));
        assert!(with(|r| r.groups = vec!["x".into(), "g".into()]).admits(&p));
        assert!(with(|r| r.models = vec!["m".into()]).admits(&p));
        assert!(!with(|r| r.groups = vec!["x".into()]).admits(&p));
        assert!(with(|r| r.any_authenticated = true).admits(&p));
        assert!(!with(|r| r.any_authenticated = true).is_empty());
    }
}
