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
    /// Globs on the namespace; a cluster-scoped request has none and matches no entry. A
    /// request across all namespaces ([`KubeAction::all_namespaces`]) matches every entry of a
    /// rule that blocks or holds (it reaches those namespaces too), none of a rule that allows.
    pub namespaces: Vec<String>,
    /// Globs on the object's name. A request of a whole collection (a `list`, `watch` or
    /// `deletecollection` with no name, [`KubeAction::all_names`]) matches every entry of a
    /// rule that blocks or holds (it reaches those objects too), none of a rule that allows.
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
    /// Only a rule that names what it reaches may allow it ([`only_by_rule`]: a port-forward,
    /// a proxy): see [`KubeMatch::names`].
    pub by_name: bool,
    /// A request of a namespaced resource across all namespaces ([`across_namespaces`]).
    pub all_namespaces: bool,
    /// A request of a whole collection, which reaches every object of it ([`whole_collection`]).
    pub all_names: bool,
}

/// Every verb a request is classified with (`kube::request_info`): the API server's, and the
/// lower-case HTTP methods of non-resource URLs.
const VERBS: [&str; 12] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "head",
    "post",
    "put",
];

/// The singular names of built-in kinds, which the API server never uses in a path: a rule
/// naming one would never match.
const SINGULARS: [(&str, &str); 22] = [
    ("pod", "pods"),
    ("secret", "secrets"),
    ("configmap", "configmaps"),
    ("namespace", "namespaces"),
    ("node", "nodes"),
    ("service", "services"),
    ("serviceaccount", "serviceaccounts"),
    ("endpoint", "endpoints"),
    ("event", "events"),
    ("persistentvolume", "persistentvolumes"),
    ("persistentvolumeclaim", "persistentvolumeclaims"),
    ("deployment", "deployments"),
    ("replicaset", "replicasets"),
    ("statefulset", "statefulsets"),
    ("daemonset", "daemonsets"),
    ("job", "jobs"),
    ("cronjob", "cronjobs"),
    ("role", "roles"),
    ("rolebinding", "rolebindings"),
    ("clusterrole", "clusterroles"),
    ("clusterrolebinding", "clusterrolebindings"),
    ("lease", "leases"),
];

impl KubeMatch {
    /// Refuses, at load, a verb, resource or subresource the API server never names that way
    /// (`DELETE`, `secret`, `Pods`, `logs`): such a rule would never match, and a guardrail
    /// would silently not be there.
    pub(super) fn check(&self) -> Result<(), String> {
        if let Some(v) = self
            .verbs
            .iter()
            .find(|v| v.as_str() != "*" && !VERBS.contains(&v.as_str()))
        {
            return Err(format!(
                "verbs: {v:?} is not a verb of a Kubernetes request; use `*` or: {}",
                VERBS.join(", ")
            ));
        }
        for (field, patterns) in [
            ("resources", &self.resources),
            ("subresources", &self.subresources),
        ] {
            for p in patterns {
                if p.chars().any(|c| c.is_ascii_uppercase()) {
                    return Err(format!(
                        "{field}: {p:?} has upper case, but the API server names resources in lower case, as in its paths"
                    ));
                }
                for part in p.split('/') {
                    if let Some((_, plural)) = SINGULARS.iter().find(|(one, _)| *one == part) {
                        return Err(format!(
                            "{field}: {p:?} names {part:?}, but the API server names resources in the plural, as in its paths: {plural:?}"
                        ));
                    }
                    if field == "subresources" || p.ends_with(&format!("/{part}")) {
                        if let Some(right) = match part {
                            "logs" => Some("log"),
                            "port-forward" | "portforwards" => Some("portforward"),
                            "evictions" => Some("eviction"),
                            _ => None,
                        } {
                            return Err(format!(
                                "{field}: {p:?} names the subresource {part:?}, which the API server calls {right:?}"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn matches(&self, a: &KubeAction<'_>) -> bool {
        self.matches_in(a, false, false)
    }

    /// Whether the rule matches `a` with its `namespaces` condition taken to hold where `a`
    /// reaches every namespace ([`KubeAction::all_namespaces`]) and its `names` condition
    /// where `a` reaches every object ([`KubeAction::all_names`]): how a rule that blocks or
    /// holds sees it.
    pub fn matches_everything_reached(&self, a: &KubeAction<'_>) -> bool {
        self.matches_in(a, a.all_namespaces, a.all_names)
    }

    fn matches_in(&self, a: &KubeAction<'_>, every_namespace: bool, every_name: bool) -> bool {
        let any = |globs: &[String], text: &str| globs.iter().any(|g| glob_match(g, text));
        (self.verbs.is_empty() || self.verbs.iter().any(|v| v == "*" || v == a.verb))
            && (self.resources.is_empty() || self.resources.iter().any(|r| resource_matches(r, a)))
            && (self.subresources.is_empty() || any(&self.subresources, a.subresource))
            && (self.namespaces.is_empty()
                || every_namespace
                || (!a.namespace.is_empty() && any(&self.namespaces, a.namespace)))
            && (self.names.is_empty()
                || every_name
                || (!a.name.is_empty() && any(&self.names, a.name)))
            && self.command.matches(a.command, a.line)
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the rule names what the action reaches rather than only covering it: a
    /// `subresources` condition, or a resource pattern that matches the resource with its
    /// subresource but not the resource alone (`pods/portforward`, `*/proxy`, `pods/*`, where
    /// `pods` and `*` also match `pods`); for the legacy `proxy` verb, `verbs` listing it.
    pub fn names(&self, a: &KubeAction<'_>) -> bool {
        if a.subresource.is_empty() {
            return self.verbs.iter().any(|v| v == a.verb);
        }
        let bare = KubeAction {
            subresource: "",
            ..*a
        };
        !self.subresources.is_empty()
            || self
                .resources
                .iter()
                .any(|r| resource_matches(r, a) && !resource_matches(r, &bare))
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

/// The resources whose registry strategy has `AllowCreateOnUpdate() == true` in Kubernetes
/// 1.20 (`pkg/registry/*/*/strategy.go`), as `(group, resource)`: an update (PUT) of one that
/// does not exist creates it. Events of `events.k8s.io` are stored by the core group's events
/// registry. Custom resources do not create on update; what an aggregated API server does is
/// unknown here.
const CREATE_ON_UPDATE: &[(&str, &str)] = &[
    ("", "endpoints"),
    ("", "events"),
    ("", "limitranges"),
    ("", "services"),
    ("coordination.k8s.io", "leases"),
    ("events.k8s.io", "events"),
    ("node.k8s.io", "runtimeclasses"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("rbac.authorization.k8s.io", "roles"),
];

/// Whether an update or patch may create its object, so that the API server authorises it as
/// `create` too (`handlers/update.go`, `handlers/patch.go`: the create-on-update admission
/// check runs `create` authorization with the request's resource and subresource):
/// - an update (PUT) of a resource in [`CREATE_ON_UPDATE`], or of its `status` (the status
///   strategy shares the resource's), for an object that does not exist;
/// - a server-side apply (a patch whose media type is `application/apply-patch+…`, compared
///   without case or parameters), which creates any resource's missing object (`status` only
///   of those same resources: the status storage does not pass on apply's permission).
///
/// Whether the object exists is not known before the request runs: every such request counts.
pub fn may_create(
    verb: &str,
    api_group: &str,
    resource: &str,
    subresource: &str,
    content_type: Option<&str>,
) -> bool {
    let creates_on_update = CREATE_ON_UPDATE.contains(&(api_group, resource));
    let apply = content_type.is_some_and(|t| {
        let media = t.split(';').next().unwrap_or_default().trim();
        media
            .get(..23)
            .is_some_and(|p| p.eq_ignore_ascii_case("application/apply-patch"))
    });
    match (verb, subresource) {
        ("update", "" | "status") => creates_on_update,
        ("patch", "") => apply,
        ("patch", "status") => apply && creates_on_update,
        _ => false,
    }
}

/// The cluster-scoped resources of Kubernetes 1.20 (`NamespaceScoped() == false` in
/// `pkg/registry`, apiextensions and kube-aggregator), as `(group, resource)`.
const CLUSTER_SCOPED: &[(&str, &str)] = &[
    ("", "componentstatuses"),
    ("", "namespaces"),
    ("", "nodes"),
    ("", "persistentvolumes"),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
    ),
    (
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
    ),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("apiregistration.k8s.io", "apiservices"),
    ("authentication.k8s.io", "tokenreviews"),
    ("authorization.k8s.io", "selfsubjectaccessreviews"),
    ("authorization.k8s.io", "selfsubjectrulesreviews"),
    ("authorization.k8s.io", "subjectaccessreviews"),
    ("certificates.k8s.io", "certificatesigningrequests"),
    ("flowcontrol.apiserver.k8s.io", "flowschemas"),
    (
        "flowcontrol.apiserver.k8s.io",
        "prioritylevelconfigurations",
    ),
    ("internal.apiserver.k8s.io", "storageversions"),
    ("networking.k8s.io", "ingressclasses"),
    ("node.k8s.io", "runtimeclasses"),
    ("policy", "podsecuritypolicies"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("storage.k8s.io", "csidrivers"),
    ("storage.k8s.io", "csinodes"),
    ("storage.k8s.io", "storageclasses"),
    ("storage.k8s.io", "volumeattachments"),
];

/// Whether a request with no namespace reaches every namespace: a list or watch (the only
/// requests the API server serves across namespaces) of a resource that is not cluster-scoped
/// ([`CLUSTER_SCOPED`]; a custom resource counts as namespaced, the safe side), as
/// `kubectl get secrets -A` is.
pub fn across_namespaces(verb: &str, api_group: &str, resource: &str, namespace: &str) -> bool {
    matches!(verb, "list" | "watch")
        && namespace.is_empty()
        && !resource.is_empty()
        && !CLUSTER_SCOPED.contains(&(api_group, resource))
}

/// Whether a request reaches every object of its collection: a `list`, `watch` or
/// `deletecollection` with no name (a `fieldSelector` that requires one name gives the request
/// that name; any other selector, `metadata.name!=x` included, still reads or deletes the
/// object a rule names).
pub fn whole_collection(verb: &str, resource: &str, name: &str) -> bool {
    matches!(verb, "list" | "watch" | "deletecollection") && name.is_empty() && !resource.is_empty()
}

/// What a request also does to each object it reaches: a `list` or `watch` returns each
/// object as a `get` would; a `deletecollection` deletes each as a `delete` and, as a
/// `delete`, `patch` or `update` does, answers with the objects as stored, values the client
/// did not send included (a merge patch of a label, or any of them with `dryRun`, reads a
/// Secret whole; outside review, 2026-12-07).
pub fn per_object_verbs(verb: &str) -> &'static [&'static str] {
    match verb {
        "list" | "watch" | "patch" | "update" | "delete" => &["get"],
        "deletecollection" => &["delete", "get"],
        _ => &[],
    }
}

/// Whether a request deletes a pod though its verb is another: an eviction (`create` of
/// `pods/eviction`), which the API server carries out by deleting the pod.
pub fn evicts(verb: &str, api_group: &str, resource: &str, subresource: &str) -> bool {
    (verb, api_group, resource, subresource) == ("create", "", "pods", "eviction")
}

/// Whether a request runs what a `create` runs though its verb is another: an exec, attach or
/// port-forward asked for with a GET (the WebSocket protocols), which the API server 1.20
/// authorises as `get` (newer ones check `create` too), and which does what the POST of the
/// SPDY protocol (`create`) does.
pub fn runs_like_create(verb: &str, subresource: &str) -> bool {
    verb != "create" && matches!(subresource, "exec" | "attach" | "portforward")
}

/// What a request reaches through the API server that a rule must allow by name (the policy's
/// `default` does not apply): a port-forward (any protocol on a pod's port) and the `proxy`
/// subresource of nodes (the kubelet's own API: `/run`, `/exec`, `/logs`, a command execution
/// that exec rules never see), pods and services (HTTP to any port behind them), and the
/// legacy `proxy` verb (`/api/v1/proxy/…`). `None` for anything else.
pub fn only_by_rule(verb: &str, resource: &str, subresource: &str) -> Option<String> {
    match (verb, subresource) {
        (_, "portforward") => Some("port-forward".into()),
        (_, "proxy") => Some(format!("{resource}/proxy")),
        ("proxy", _) => Some(format!("proxying to {resource}")),
        _ => None,
    }
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
            by_name: false,
            all_namespaces: false,
            all_names: false,
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
    fn creates_by_update_or_apply_and_what_only_a_rule_allows() {
        let apply = Some("application/apply-patch+yaml");
        let merge = Some("application/merge-patch+json");
        assert!(may_create("update", "", "services", "", None));
        assert!(may_create("update", "", "services", "status", None));
        assert!(!may_create("update", "", "services", "proxy", None));
        assert!(may_create(
            "update",
            "rbac.authorization.k8s.io",
            "rolebindings",
            "",
            None
        ));
        assert!(
            !may_create("update", "", "rolebindings", "", None),
            "by group"
        );
        assert!(may_create("update", "events.k8s.io", "events", "", None));
        assert!(!may_create("update", "", "configmaps", "", None));
        assert!(!may_create("update", "apps", "deployments", "scale", None));
        assert!(may_create("patch", "", "configmaps", "", apply));
        assert!(may_create("patch", "example.com", "widgets", "", apply));
        assert!(!may_create("patch", "", "configmaps", "", merge));
        assert!(!may_create("patch", "", "configmaps", "", None));
        assert!(!may_create("patch", "", "configmaps", "status", apply));
        assert!(may_create("patch", "", "services", "status", apply));
        assert!(!may_create("patch", "apps", "deployments", "scale", apply));
        assert!(!may_create("create", "", "configmaps", "", apply));
        assert!(!may_create("get", "", "services", "", None));
        assert_eq!(
            only_by_rule("create", "pods", "portforward").as_deref(),
            Some("port-forward")
        );
        assert_eq!(
            only_by_rule("get", "nodes", "proxy").as_deref(),
            Some("nodes/proxy")
        );
        assert_eq!(
            only_by_rule("proxy", "services", "").as_deref(),
            Some("proxying to services")
        );
        assert_eq!(only_by_rule("get", "pods", "log"), None);
        assert_eq!(only_by_rule("create", "pods", "exec"), None);
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
