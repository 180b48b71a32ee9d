"""The HTTP query API: the app, its routes and queries, the answer caches, serving and the
dashboard."""
