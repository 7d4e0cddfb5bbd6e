"""Who acts and what they did: identities, API keys, the access policy, the audit trail; personal data found
(pii) and filtered at inference (privacy). Erasure, which reaches every store, is a pipeline operation
(llmops.pipeline.erasure)."""
