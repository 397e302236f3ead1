//! What the coordinator's integration tests share: a member started in-process, and clients.
// Each test crate that includes this module uses part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;
use vigil_coordinator::client::{Client, Credential};
use vigil_coordinator::server::{Member, MemberConfig};
use vigil_coordinator::service::OperatorAuth;

/// Member `id`, its data in `dir`, taking `token` as the cluster token and operators through
/// `auth`; `tune` sets the rest of its configuration (`bootstrap`, `embedded` …). A member
/// that bootstraps is returned once it leads.
pub async fn member(
    dir: &std::path::Path,
    id: u64,
    token: &str,
    auth: Arc<dyn OperatorAuth>,
    tune: impl FnOnce(&mut MemberConfig),
) -> Member {
    let mut cfg = MemberConfig::new(
        id,
        "127.0.0.1:0".parse().unwrap(),
        dir.to_path_buf(),
        token.into(),
    );
    tune(&mut cfg);
    let leads = cfg.bootstrap;
    let member = Member::start(cfg, Some(auth)).await.expect("member starts");
    if leads {
        member
            .wait_for_leader(Duration::from_secs(10))
            .await
            .unwrap();
    }
    member
}

/// A client of `member` with `credential`, retrying for 2 s.
pub fn client(member: &Member, credential: Credential) -> Client {
    Client::new(vec![member.addr.to_string()], credential)
        .unwrap()
        .retry_for(Duration::from_secs(2))
}
