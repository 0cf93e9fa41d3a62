"""The web page: a Gradio 6 shell around a browser canvas, small JSON routes and a typed session state.

`state` (the session as dataclasses, edits as plain functions), `backend` (the one seam to the engine),
`sessions` (bounded store, expiry, per-session folder), `routes` (the page's JSON routes),
`guard` (no Gradio event may name a server file), `page` (the Blocks and the mount).
"""
