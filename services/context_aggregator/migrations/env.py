from oma.shared.db import alembic_env

alembic_env()
