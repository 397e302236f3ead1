//! The Kubernetes matcher of a rule: what an API request is (its verb, resource, subresource,
//! namespace and name, as the API server classifies it) and, for `exec` and `attach`, the
//! command it runs, matched like an SSH exec.

use super::ssh::CommandMatch;
use crate::ssh::command::{glob_match, CommandLine, SimpleCommand};

/// The Kubernetes part of a rule. Every condition given must hold; inside a list any entry
/// may match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeMatch {
    /// Kubernetes verbs (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`), or `*`. Non-resource URLs have the lower-case HTTP method.
    pub verbs: Vec<String>,
    /// `resource` (any API group) or `group/resource` (`apps/deployments`; the core group is
    /// `core/pods` or just `pods`); globs. With a subresource, `pods/exec` also matches.
    pub resources: Vec<String>,
    /// Globs on the subresource (`exec`, `attach`, `portforward`, `log`, `scale`, `status`).
    pub subresources: Vec<String>,
    /// Globs on the namespace; a cluster-scoped request has none and matches no entry.
    pub namespaces: Vec<String>,
    /// Globs on the object's name.
    pub names: Vec<String>,
    /// What an exec's command is, as for an SSH exec.
    pub command: CommandMatch,
}

/// One thing to decide: a request, or (exec) one command of its command line.
#[derive(Clone, Copy, Debug)]
pub struct KubeAction<'a> {
    pub verb: &'a str,
    pub api_group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub command: Option<&'a SimpleCommand>,
    pub line: Option<&'a CommandLine>,
}

impl KubeMatch {
    pub fn matches(&self, a: &KubeAction<'_>) -> bool {
        let any = |globs: &[String], text: &str| globs.iter().any(|g| glob_match(g, text));
        (self.verbs.is_empty() || self.verbs.iter().any(|v| v == "*" || v == a.verb))
            && (self.resources.is_empty() || self.resources.iter().any(|r| resource_matches(r, a)))
            && (self.subresources.is_empty() || any(&self.subresources, a.subresource))
            && (self.namespaces.is_empty()
                || (!a.namespace.is_empty() && any(&self.namespaces, a.namespace)))
            && (self.names.is_empty() || (!a.name.is_empty() && any(&self.names, a.name)))
            && self.command.matches(a.command, a.line)
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `resource`, `group/resource`, or either with `/subresource`; `core` names the core group.
fn resource_matches(pattern: &str, a: &KubeAction<'_>) -> bool {
    let group = if a.api_group.is_empty() {
        "core"
    } else {
        a.api_group
    };
    let with_sub = |r: &str| {
        if a.subresource.is_empty() {
            r.to_string()
        } else {
            format!("{r}/{}", a.subresource)
        }
    };
    let candidates = [
        a.resource.to_string(),
        with_sub(a.resource),
        format!("{group}/{}", a.resource),
        format!("{group}/{}", with_sub(a.resource)),
    ];
    !a.resource.is_empty() && candidates.iter().any(|c| glob_match(pattern, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action<'a>(
        verb: &'a str,
        group: &'a str,
        resource: &'a str,
        sub: &'a str,
    ) -> KubeAction<'a> {
        KubeAction {
            verb,
            api_group: group,
            resource,
            subresource: sub,
            namespace: "staging",
            name: "web",
            command: None,
            line: None,
        }
    }

    #[test]
    fn resources_match_with_or_without_their_group_and_subresource() {
        let m = |r: &str| KubeMatch {
            resources: vec![r.into()],
            ..KubeMatch::default()
        };
        let scale = action("patch", "apps", "deployments", "scale");
        assert!(m("deployments").matches(&scale));
        assert!(m("apps/deployments").matches(&scale));
        assert!(m("deployments/scale").matches(&scale));
        assert!(m("apps/deployments/scale").matches(&scale));
        assert!(!m("core/deployments").matches(&scale));
        let exec = action("create", "", "pods", "exec");
        assert!(m("core/pods").matches(&exec));
        assert!(m("pods/exec").matches(&exec));
        assert!(!m("pods/log").matches(&exec));
        assert!(m("*").matches(&exec));
        let discovery = action("get", "", "", "");
        assert!(
            !m("*").matches(&discovery),
            "a non-resource URL is no resource"
        );
    }

    #[test]
    fn a_namespace_condition_never_matches_a_cluster_scoped_request() {
        let m = KubeMatch {
            namespaces: vec!["*".into()],
            ..KubeMatch::default()
        };
        let mut nodes = action("delete", "", "nodes", "");
        nodes.namespace = "";
        assert!(!m.matches(&nodes));
        assert!(m.matches(&action("delete", "", "pods", "")));
    }
}
