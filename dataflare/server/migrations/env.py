"""Alembic environment of the server's store (run by ``dataflare.server.store.migrate``)."""

from alembic import context

from dataflare.server.store import engine_for, metadata

url = context.config.get_main_option("sqlalchemy.url")
assert url is not None
with engine_for(url).connect() as connection:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
