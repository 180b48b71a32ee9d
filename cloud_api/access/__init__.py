"""Access control: who may call the API and see what (tokens, API keys, roles, rate limits,
personal data, audit, revocations and the security perimeter)."""
