"""Alerts: rules over the stored facts, evaluated by `cloud-api alerts` workers, each opened and
resolved alert delivered once per receiver (signed webhook, Slack, Teams, e-mail).

Modules: `rules` (the rule model and what each kind finds in the database), `settings` (the
`alerts:` section of the cloud YAML: receivers, SMTP, delivery bounds, file rules), `store`
(rules, alerts and the delivery outbox in PostgreSQL), `signature` (the webhook signature,
for senders and receivers), `delivery` (payload shapes and the senders), `worker` (the
evaluation and delivery loops), `routes` (`/v1/alerts`), `cli` (`cloud-api alerts`).
"""
