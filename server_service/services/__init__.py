"""Server logic: auth, edges, models, cycles, uploads, training, deadline watching.

Routes call these functions; they talk to the database (SQLAlchemy sessions) and the
blob store, and raise :mod:`fl_core.errors` exceptions that one handler maps to HTTP.
"""
