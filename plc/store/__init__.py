"""The mirror's PostgreSQL store: where the database is (a configured URL or the embedded
private server in `embedded`), its schema migrations, and the queries the service runs."""
