//! The product's grant (client credentials): the same schedule as a subscriber's, a token shared by
//! every grant with the same issuer, client and scope, no state Secret.

use super::*;

impl Run<'_> {
    /// A product grant (client credentials): the same schedule, a token shared by every grant with
    /// the same issuer, client and scope, no state Secret.
    pub(super) async fn reconcile_product(
        &self,
        inputs: &inputs::Inputs,
        target_secret: Option<Secret>,
    ) -> Result<Next, Error> {
        let now = Timestamp::now();
        let published = target_secret.as_ref().and_then(target::published_token);
        match self.decide(now, published, false) {
            Decision::WaitUntil(at) => self.keep_until(now, published, target_secret.as_ref(), at).await,
            Decision::BackingOff(at) => {
                debug!(next_attempt = %at, "backing off after failed attempts");
                Ok(Next::requeue(until(now, at)))
            }
            Decision::RefreshNow(why) => self.product_token(inputs, why, target_secret, published).await,
        }
    }

    pub(super) async fn product_token(
        &self,
        inputs: &inputs::Inputs,
        why: RefreshReason,
        target_secret: Option<Secret>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Next, Error> {
        let recovering = self.failed_attempts() > 0;
        let spec = &self.grant.spec;
        let client = match self.oauth_client(inputs).await {
            Ok(client) => client,
            Err(err) => return self.refresh_failed(err, None, published).await,
        };
        if !self.ctx.shared.leadership.is_leader() {
            return Ok(Next::await_change());
        }
        let scope = spec.scope.as_deref();
        let key = product::key(&spec.issuer_url, &inputs.client_id, inputs.client_secret.secret(), scope);
        let want = product::Want {
            published,
            refresh_before: self.refresh_before(),
            jitter_seed: self.jitter_seed(),
            // Asked for by a person: a new token, and at once; its retries follow the key's backoff.
            forced: why == RefreshReason::Requested && !recovering,
        };
        let options = &self.ctx.options;
        let metrics = &self.ctx.shared.metrics;
        let retry_at = |err: &OAuthError, attempts: u32| {
            let random = (self.jitter_seed() % 1000) as f64 / 1000.0;
            let backoff = (options.min_backoff, options.max_backoff);
            product::retry_at(err, attempts, backoff, outcome::PERMANENT_RECHECK, random, Timestamp::now())
        };
        let request = || async {
            info!(reason = why.as_str(), "requesting a product token (client credentials)");
            let sent = Instant::now();
            let answer = client.client_credentials(scope).await;
            let seconds = sent.elapsed().as_secs_f64();
            metrics.token_request(
                GRANT_TYPE_CLIENT_CREDENTIALS,
                outcome::request_result(answer.as_ref().err()),
                seconds,
            );
            answer.map(|tokens| {
                let issued_at = whole_seconds(Timestamp::now());
                let expires_at = whole_seconds(tokens.expires_at.unwrap_or(issued_at + DEFAULT_LIFETIME));
                product::Issued { tokens, times: schedule::TokenTimes { issued_at, expires_at } }
            })
        };
        let (answer, source) = self.ctx.products.token(&key, &want, retry_at, request).await;
        self.ctx.memory.count_refresh(&self.key, outcome::request_result(answer.as_ref().err()));
        let issued = match answer {
            Ok(issued) => issued,
            Err(err) => return self.refresh_failed(err, None, published).await,
        };
        if source == product::Source::Shared {
            debug!(issued_at = %issued.times.issued_at, "using the product token another grant requested");
        }
        let source = match source {
            product::Source::Requested => metrics::source::REQUESTED,
            product::Source::Shared => metrics::source::SHARED,
        };
        let request = self.grant.refresh_requested.as_deref();
        let next =
            self.publish_token(&issued.tokens, issued.times, None, target_secret.as_ref(), source, request).await?;
        self.ctx.memory.reset_api_backoff(&self.key);
        if schedule::announce(why, recovering) {
            self.event(EventType::Normal, reason::REFRESHED, format!("Access token renewed: {}", why.as_str())).await;
        }
        Ok(Next::requeue(until(Timestamp::now(), next)))
    }
}
