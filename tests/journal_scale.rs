//! The journal at scale: SIGKILL 3 s and 4 s into the first convergence of 1,000 grants, against a
//! fast token endpoint that rotates refresh tokens and refuses any presented twice (as Hydra does
//! without a grace period; correctness against Hydra itself is in `journal.rs`), then a restart
//! with the same journal directory, as kubelet restarts a container in its pod: no answer is lost.
//! A grant whose token request was in flight at the kill (the endpoint rotated, the answer never
//! arrived) is lost whatever a client does; the test requires every lost grant to be one of those.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kube::api::ListParams;
use support::Env;
use wgtwo_testenv::token_server::USER_TOKEN_PREFIX;
use wgtwo_testenv::{HydraOptions, RotatingTokenServer};

const GRANTS: usize = 1000;
const CLIENTS: usize = 10;

/// Grants named `{prefix}*` whose Ready condition is True.
async fn ready(env: &Env, prefix: &str) -> usize {
    let grants = env.grants().list(&ListParams::default()).await.unwrap();
    grants
        .items
        .iter()
        .filter(|g| g.metadata.name.as_deref().is_some_and(|n| n.starts_with(prefix)))
        .filter(|g| {
            g.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_3_s_and_4_s_into_the_first_convergence_of_1000_grants_loses_with_the_journal_only_grants_whose_token_request_was_in_flight()
 {
    let mut env = Env::start(HydraOptions::default()).await;
    let stub = RotatingTokenServer::start(3600).await.unwrap();
    env.put_clients(CLIENTS).await;
    let journal = env.dir.path().join("journal");
    let args =
        ["--leader-elect=false", "--allowed-issuer", stub.base_url(), "--journal-dir", journal.to_str().unwrap()];
    for (batch, kill_after) in [(0, Duration::from_secs(3)), (1, Duration::from_secs(4))] {
        let prefix = format!("b{batch}-");
        let (grant, token) = (|i| format!("{prefix}g{i}"), |i| format!("{USER_TOKEN_PREFIX}{prefix}{i}"));
        env.create_grants_at(stub.base_url(), GRANTS, CLIENTS, grant, token).await;
        let before = stub.token_requests();
        let operator = env.start_operator_with(&args).0;
        tokio::time::sleep(kill_after).await;
        operator.signal(libc::SIGKILL).unwrap();
        drop(operator);
        let answered = stub.token_requests() - before;
        // Answers whose state Secret write had not completed: each a grant lost without the journal.
        let in_journal = support::journal_entries(&journal).len();
        let ready_at_kill = ready(&env, &prefix).await;

        // The killed process's log: the grants whose token request it had sent and not yet seen
        // answered. A rotation the identity service committed for one of those is lost whatever
        // the client does; every other answer must survive.
        let in_flight = support::requests_in_flight_at_end(support::operator_logs(&env).last().unwrap());

        let restarted = Instant::now();
        let mut operator = env.start_operator_with(&args).0;
        let lost = |stub: &RotatingTokenServer| -> BTreeSet<String> {
            let user = format!("{USER_TOKEN_PREFIX}{prefix}");
            stub.ended_lineages()
                .iter()
                .filter_map(|root| root.strip_prefix(&user).map(|i| format!("{prefix}g{i}")))
                .collect()
        };
        while ready(&env, &prefix).await + lost(&stub).len() < GRANTS {
            assert!(restarted.elapsed() < Duration::from_secs(300), "not all Ready 300 s after the restart");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let converged = restarted.elapsed();
        operator.terminate(Duration::from_secs(10)).unwrap();
        let lost = lost(&stub);
        let unexplained: Vec<_> = lost.difference(&in_flight).collect();
        if !unexplained.is_empty() {
            // What the operators logged about them: the story of the loss.
            let story: Vec<String> = support::operator_logs(&env)
                .iter()
                .enumerate()
                .flat_map(|(n, log)| {
                    let unexplained = &unexplained;
                    log.lines()
                        .filter(move |l| {
                            unexplained
                                .iter()
                                .any(|g| l.contains(&format!("grant=\"{g}\"")) || l.contains(&format!("grant={g} ")))
                        })
                        .map(move |l| format!("operator-{}: {l}", n + 1))
                })
                .collect();
            panic!("grants lost with no token request in flight at the kill: {unexplained:?}\n{}", story.join("\n"));
        }
        assert_eq!(support::journal_entries(&journal).len(), 0, "the journal is empty once every answer is persisted");
        println!(
            "SIGKILL {}s into the first convergence of {GRANTS} grants: {answered} token answers before the kill, {ready_at_kill} grants Ready, {in_journal} answers only in the journal, {} token requests in flight; after the restart all other grants Ready in {:.1}s, {} lost {lost:?} (each had its request in flight at the kill)",
            kill_after.as_secs(),
            in_flight.len(),
            converged.as_secs_f64(),
            lost.len(),
        );
    }
}
