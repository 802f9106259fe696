"""`gpumesh tui`: the console. A Textual app that attaches to any node over HTTP.

It never imports the daemon (`gpumesh.mesh`): everything it knows comes from a node's
management API and its `/api/events` stream.
"""
