//! The subscriber's grant (a rotating refresh token): its inputs, the refresh, and the answer's
//! way into the state Secret (first), the target Secret and the status, also when a write of it
//! failed and it is decided again.

use super::*;

impl Run<'_> {
    /// For a kept answer whose state write failed: the state Secret as stored now, if the answer
    /// still belongs in it (or is in it already: its write landed after all); `None` when something
    /// newer took its place (another leader refreshed from what the failed write left, the grant was
    /// recreated, the subscriber authorized again): the answer is dropped, never written over it.
    pub(super) async fn confirm_kept(&self, pending: &Pending) -> Result<Option<Option<Secret>>, Error> {
        let epoch = self.ctx.cache.epoch();
        let stored = self.secrets.get_opt(&self.state_name()).await?;
        let state = stored.as_ref().and_then(|s| s.data.as_ref()).and_then(lineage::decode);
        // Read as replay reads it: a subscriber who authorized again since supersedes the answer
        // (written over the new lineage, it would have the next reconcile adopt the new token
        // again: a reuse).
        let user_token_sha256 = match self.grant.spec.refresh_token.as_ref() {
            Some(r) => inputs::user_token(self.secrets.get_opt(&r.name).await?.as_ref(), &r.name, &r.key)
                .ok()
                .map(|token| lineage::sha256_hex(&[&token])),
            None => None,
        };
        let uid = self.grant.uid();
        let seen = replay::Seen {
            grant_uid: uid.as_deref(),
            state_foreign: stored.as_ref().is_some_and(|s| !self.owns(s)),
            state: state.as_ref(),
            user_token_sha256: user_token_sha256.as_deref(),
        };
        match replay::verdict(&pending.answer(), &seen) {
            replay::Verdict::Write | replay::Verdict::AlreadyPersisted => {
                if let Some(stored) = &stored {
                    self.ctx.cache.wrote(stored, epoch);
                }
                Ok(Some(stored))
            }
            replay::Verdict::Superseded(why) => {
                warn!(reason = why, "a kept refresh answer was superseded before it could be written; dropped");
                self.ctx.memory.superseded(&self.key);
                self.unjournal();
                Ok(None)
            }
        }
    }

    /// An input that is not this grant's to read: a Secret the operator writes (a grant author who
    /// may not read Secrets would otherwise have the operator present another grant's live refresh
    /// token, forking its lineage), or a refresh-token Secret an older grant uses (two lineages from
    /// one token: the second presentation revokes the first's family).
    pub(super) async fn foreign_input(&self) -> Result<Option<inputs::Problem>, Error> {
        let spec = &self.grant.spec;
        let token = spec.refresh_token.as_ref();
        let named =
            [(Some(&*spec.client_secret), "clientSecretRef"), (token.map(|t| &*t.name), "refreshTokenSecretRef")];
        for (name, field) in named {
            let Some(name) = name else { continue };
            if self.ctx.cache.is_operators(&self.ns, name) {
                return Ok(Some(inputs::Problem {
                    reason: reason::SECRET_NOT_ALLOWED,
                    message: format!(
                        "Secret {name} ({field}) is written by the operator for a grant (its state or target Secret) and cannot be a grant's input: name the Secret that holds the authorization or the OAuth client"
                    ),
                }));
            }
        }
        let Some(token) = token else { return Ok(None) };
        let users = self.ctx.index.token_users(&self.ns, &token.name);
        if users.len() < 2 {
            return Ok(None);
        }
        // Several grants name it: the one whose lineage began from the token it holds now keeps it
        // (whatever the grants' ages: an older grant re-pointed at it must not fork that lineage).
        let current = self.read_once(&token.name, &token.key).await?;
        let source =
            inputs::user_token(current.as_ref(), &token.name, &token.key).ok().map(|t| lineage::sha256_hex(&[&t]));
        let holds = |grant: &str| {
            source.is_some() && self.ctx.cache.state_source(&self.ns, &lineage::state_secret_name(grant)) == source
        };
        let Some(user) = index::token_user(&users, holds) else { return Ok(None) };
        Ok((user != self.grant.name_any()).then(|| inputs::Problem {
            reason: reason::REFRESH_TOKEN_IN_USE,
            message: format!(
                "Secret {} (refreshTokenSecretRef) is the authorization of grant {user} already: one refresh token can start one lineage only (every refresh rotates it, and presenting it twice revokes it). Authorize this grant separately (wgtwo-operator authorize {} -n {}), or delete one of the grants",
                token.name,
                self.grant.name_any(),
                self.ns
            ),
        }))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn refresh(
        &self,
        inputs: &inputs::Inputs,
        chosen: lineage::Chosen,
        fingerprint: String,
        why: RefreshReason,
        state_secret: Option<Secret>,
        target_secret: Option<Secret>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Next, Error> {
        let recovering = self.failed_attempts() > 0;
        let client = match self.oauth_client(inputs).await {
            Ok(client) => client,
            Err(err) => {
                let refused = Refused { chosen, fingerprint, state: state_secret.as_ref() };
                return self.refresh_failed(err, Some(refused), published).await;
            }
        };
        // A refresh token may be presented once only, so the state it came from must be the latest:
        // a copy this process wrote itself in this leadership term is; any other (a watch event, a
        // copy from before another leader's term, or none at all) may lag a write of the previous
        // leader or process, and is confirmed by a consistent read: the term's one LIST of the
        // operator's Secrets, or this Secret's own GET when the LIST could not confirm it. Either
        // way the version this reconcile decided on must be the confirmed one.
        let epoch = self.ctx.shared.leadership.epoch();
        let state_name = self.state_name();
        let cache = &self.ctx.cache;
        let mut confirmed = cache.confirmed_version(&self.ns, &state_name, epoch);
        if confirmed.is_none() {
            if let Err(err) = cache.confirm_owned(&self.ctx.owned_secrets(), epoch).await {
                warn!(error = %kube_message(&err), "could not LIST the operator's Secrets to confirm the cached copies; reading the state Secret instead");
            }
            confirmed = cache.confirmed_version(&self.ns, &state_name, epoch);
        }
        let stored = match confirmed {
            Some(version) => Some(version),
            None => {
                let stored = self.secrets.get_opt(&state_name).await?;
                if let Some(stored) = &stored {
                    cache.wrote(stored, epoch);
                }
                stored.and_then(|s| s.resource_version())
            }
        };
        if stored != state_secret.as_ref().and_then(|s| s.resource_version()) {
            debug!("the cached state Secret was behind the stored one; deciding again");
            return Ok(Next::requeue(outcome::AGAIN_SOON));
        }
        // Checked after the last await before sending: a replica whose Lease may lapse before the
        // answer is persisted must not present the refresh token (the next leader would too).
        // The term must also be the one the state was confirmed in.
        if !self.ctx.shared.leadership.may_send(self.ctx.options.lease_margin())
            || self.ctx.shared.leadership.epoch() != epoch
        {
            return Ok(if self.ctx.shared.leadership.is_leader() {
                debug!("Lease held with too little margin; refresh deferred");
                Next::requeue(outcome::LEASE_WAIT)
            } else {
                Next::await_change()
            });
        }
        // Deleted meanwhile (its Secrets go with it): nothing to refresh for.
        if is_gone(self.ctx, &self.key, self.grant) {
            return Ok(Next::await_change());
        }
        info!(reason = why.as_str(), "refreshing");
        let sent = Instant::now();
        let (uid, presented_sha256) =
            (self.grant.uid().unwrap_or_default(), lineage::sha256_hex(&[chosen.refresh_token.secret()]));
        let pending = |tokens: TokenSet, (received, refreshed_at): (Instant, Timestamp)| Pending {
            uid: uid.clone(),
            presented_sha256: presented_sha256.clone(),
            refresh_token: tokens.refresh_token.clone().unwrap_or_else(|| chosen.refresh_token.clone()),
            source: chosen.source.clone(),
            source_version: chosen.source_version.clone(),
            tokens,
            refreshed_at,
            received,
            persisted: false,
            request: self.grant.refresh_requested.as_deref().map(str::to_owned),
        };
        let mut answered = None;
        let scope = self.grant.spec.scope.as_deref();
        let result = client
            .refresh_then(&chosen.refresh_token, scope, |tokens| {
                // Journaled the moment the answer is parsed, before the ID token is verified.
                let at = (Instant::now(), whole_seconds(Timestamp::now()));
                answered = Some(at);
                self.journal(&chosen.refresh_token, &pending(tokens.clone(), at), Journaling::Answer);
            })
            .await;
        let at = answered.unwrap_or_else(|| (Instant::now(), whole_seconds(Timestamp::now())));
        let received = at.0;
        // Kept before anything else can fail or wait: from here on the rotated refresh token is
        // removed only once the state Secret holds it.
        let answer = result.map(|answer| {
            let pending = pending(answer.tokens.clone(), at);
            self.ctx.memory.keep(&self.key, pending.clone());
            (pending, answer)
        });
        let outcome = outcome::request_result(answer.as_ref().err());
        let seconds = received.duration_since(sent).as_secs_f64();
        self.ctx.shared.metrics.token_request(GRANT_TYPE_REFRESH_TOKEN, outcome, seconds);
        self.ctx.memory.count_refresh(&self.key, outcome);
        let (pending, answer) = match answer {
            Ok(answer) => answer,
            Err(err) => {
                let refused = Refused { chosen, fingerprint, state: state_secret.as_ref() };
                return self.refresh_failed(err, Some(refused), published).await;
            }
        };
        // The state Secret first; the ID token is verified after (it may fetch the issuer's keys).
        let verify = Verify { client: &client, answer, presented: &chosen.refresh_token };
        let (next, id_token_problem) =
            self.publish(pending, state_secret.as_ref(), target_secret.as_ref(), Some(verify)).await?;
        self.ctx.memory.reset_api_backoff(&self.key);
        if schedule::announce(why, recovering) {
            self.event(EventType::Normal, reason::REFRESHED, format!("Access token refreshed: {}", why.as_str())).await;
        }
        if let Some(problem) = id_token_problem {
            warn!(problem = %problem, "ID token of the refresh answer failed verification");
            let note = format!(
                "The ID token of the refresh answer failed verification ({problem}); the new tokens were kept, and no claim was taken from it"
            );
            self.event(EventType::Warning, reason::ID_TOKEN_NOT_VERIFIED, note).await;
        }
        Ok(Next::requeue(until(Timestamp::now(), next)))
    }

    /// Writes the answer: rotated refresh token first, then the access token, then the status. The
    /// answer stays kept in memory until all three succeeded (a retried write of the same token is
    /// harmless). With `verify` (a fresh answer), its ID token is verified alongside the state write
    /// (never holding it up), and a phone number the ID token did not carry is asked from userinfo,
    /// once per authorization. Returns when the next refresh is due, and why the ID token
    /// did not verify, if it did not.
    pub(super) async fn publish(
        &self,
        mut pending: Pending,
        state: Option<&Secret>,
        target: Option<&Secret>,
        verify: Option<Verify<'_>>,
    ) -> Result<(Timestamp, Option<String>), Error> {
        let known = state
            .and_then(|s| s.data.as_ref())
            .and_then(lineage::decode)
            .filter(|s| s.source == pending.source)
            .and_then(|s| s.phone);
        // A token whose granted scope lacks `phone` carries no phone number: nothing to ask userinfo.
        let not_granted = target::phone_not_granted(pending.tokens.scope.as_deref()).then_some(None);
        let claimed = |p: &Pending| p.tokens.id_token.as_ref().and_then(|id| id.phone_number.clone()).map(Some);
        let written_phone = claimed(&pending).or(known.clone()).or(not_granted.clone());
        let lineage_state = |phone: Option<Option<String>>| RefreshState {
            refresh_token: pending.refresh_token.clone(),
            source: pending.source.clone(),
            source_version: pending.source_version.clone(),
            failed: None,
            phone,
        };
        let mut state = state.cloned();
        // The state write and the ID token's verification run together: the write never waits
        // for the issuer's keys, and the claims reach the journal as soon as they are verified
        // while the write is still under way (a replay after a kill then publishes them too).
        // Both futures run in this task (join!), so the flag orders their synchronous parts.
        let written_now = std::sync::atomic::AtomicBool::new(pending.persisted);
        let state_write = async {
            if pending.persisted {
                return None;
            }
            // Bounded so that it ends inside the Lease margin the request was sent with.
            let data = lineage::encode(&lineage_state(written_phone.clone()));
            let name = self.state_name();
            let write = self.write_secret(&name, state.as_ref(), data, BTreeMap::new(), BTreeMap::new());
            let result = tokio::time::timeout(PERSIST_BUDGET, write).await;
            if let Ok(Ok(_)) = &result {
                written_now.store(true, std::sync::atomic::Ordering::SeqCst);
                self.ctx.memory.persisted(&self.key);
                self.unjournal();
            }
            Some(result)
        };
        let client = verify.as_ref().map(|v| v.client);
        let verification = async {
            let Verify { client, mut answer, presented } = verify?;
            client.verify_refreshed(&mut answer).await;
            if !written_now.load(std::sync::atomic::Ordering::SeqCst) && answer.tokens.id_token.is_some() {
                let mut with_claims = pending.clone();
                with_claims.tokens.id_token.clone_from(&answer.tokens.id_token);
                self.journal(presented, &with_claims, Journaling::VerifiedClaims);
            }
            Some(answer.tokens)
        };
        let (written, verified) = tokio::join!(state_write, verification);
        let persist_failure = match written {
            None => None,
            Some(Ok(Ok(secret))) => {
                pending.persisted = true;
                state = Some(secret);
                // The crash window of a rotating refresh token: answer received -> state written.
                info!(persist_ms = pending.received.elapsed().as_millis() as u64, "rotated refresh token persisted");
                None
            }
            Some(Ok(Err(err))) => Some(Error::persist_failed(&err)),
            Some(Err(_)) => {
                let why = format!("no answer from the Kubernetes API within {}s", PERSIST_BUDGET.as_secs());
                Some(Error::PersistFailed { detail: why.clone(), public: why })
            }
        };
        if let Some(tokens) = verified {
            pending.tokens.id_token = tokens.id_token;
            pending.tokens.id_token_error = tokens.id_token_error;
            // A retry of the write publishes the claims too.
            self.ctx.memory.keep(&self.key, pending.clone());
        }
        if let Some(failure) = persist_failure {
            self.report_persist_failure(&failure, target).await;
            return Err(failure);
        }
        let mut phone = claimed(&pending).or(known).or(not_granted);
        if phone.is_some() && phone != written_phone {
            // Learnt from the ID token after the state write: remembered for this lineage.
            let data = lineage::encode(&lineage_state(phone.clone()));
            match self.write_secret(&self.state_name(), state.as_ref(), data, BTreeMap::new(), BTreeMap::new()).await {
                Ok(written) => state = Some(written),
                Err(err) => warn!(error = %kube_message(&err), "could not remember the phone number"),
            }
        }
        if let (None, Some(client)) = (&phone, client) {
            // A provider may give scope-granted claims only from userinfo (OpenID Connect Core
            // 5.4). Asked after the rotated token is safe, and remembered with the lineage.
            match client.userinfo(&pending.tokens.access_token).await {
                Ok(info) => {
                    phone = Some(info.phone_number);
                    let data = lineage::encode(&lineage_state(phone.clone()));
                    if let Err(err) = self
                        .write_secret(&self.state_name(), state.as_ref(), data, BTreeMap::new(), BTreeMap::new())
                        .await
                    {
                        warn!(error = %kube_message(&err), "could not remember the phone number; userinfo is asked again next time");
                    }
                }
                Err(err) => warn!(error = %err, "userinfo failed; the phone number is asked again at the next refresh"),
            }
        }
        // Whole seconds (rounded down: never later than the server said), as RFC 3339 readers expect.
        let expires_at = whole_seconds(pending.tokens.expires_at.unwrap_or(pending.refreshed_at + DEFAULT_LIFETIME));
        let times = schedule::TokenTimes { issued_at: pending.refreshed_at, expires_at };
        let phone = phone.flatten().or_else(|| target.and_then(target::phone_number));
        let request = pending.request.as_deref();
        let next =
            self.publish_token(&pending.tokens, times, phone, target, metrics::source::REQUESTED, request).await?;
        self.ctx.memory.published(&self.key);
        Ok((next, pending.tokens.id_token_error))
    }
}

/// A fresh refresh answer, for [`Run::publish`] to verify once its rotated refresh token is safe.
pub(super) struct Verify<'a> {
    client: &'a WgtwoClient,
    answer: crate::oauth::RefreshAnswer,
    /// The refresh token the answer rotated (for the journal).
    presented: &'a RefreshToken,
}

/// A subscriber's refresh that failed: what it presented, so a refusal can be remembered.
pub(super) struct Refused<'a> {
    pub(super) chosen: lineage::Chosen,
    pub(super) fingerprint: String,
    pub(super) state: Option<&'a Secret>,
}

/// Whether a kept answer still goes to the target Secret. Once its refresh token is persisted,
/// a target token issued at or after it is this answer's (the write landed, its reply was lost) or
/// a later refresh's from that persisted token.
pub(super) fn publish_kept(pending: &Pending, published: Option<schedule::TokenTimes>) -> bool {
    !pending.persisted || published.is_none_or(|t| t.issued_at < pending.refreshed_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(issued_at: Timestamp) -> Option<schedule::TokenTimes> {
        Some(schedule::TokenTimes { issued_at, expires_at: issued_at + SignedDuration::from_secs(3600) })
    }

    #[test]
    fn a_persisted_answer_never_replaces_a_target_token_issued_at_or_after_it() {
        let at: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let second = SignedDuration::from_secs(1);
        assert!(publish_kept(&Pending::sample(at, true), None));
        assert!(publish_kept(&Pending::sample(at, true), target(at - second)));
        assert!(!publish_kept(&Pending::sample(at, true), target(at)), "its own token, already written");
        assert!(!publish_kept(&Pending::sample(at, true), target(at + second)), "a later refresh's token");
        // Not yet persisted: publish() must write the state Secret whatever the target holds.
        assert!(publish_kept(&Pending::sample(at, false), target(at + second)));
    }
}
