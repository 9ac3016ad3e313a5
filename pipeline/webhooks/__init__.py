"""Signed webhooks: an organization's endpoints hear when its jobs end.

- `endpoints`: adding (behind the address gate), listing and removing endpoints; each
  gets a `whsec_…` secret, shown once and stored sealed.
- `events`: which job state changes are events (`job.completed`, `job.failed`,
  `import.completed`), recorded with the change itself, in its transaction (the outbox).
- `signing`: the envelope and the `X-CapyDB-Signature` header.
- `transport`: one HTTP POST to the checked address, with short timeouts, no redirects
  and a capped response.
- `delivery`: one attempt of a delivery, recorded, and the backoff between attempts.
- `queue`: the Dramatiq actor that runs attempts, and the relay that wakes deliveries
  whose message was lost.
- `commands`: `capy-imports webhooks …`.
"""
