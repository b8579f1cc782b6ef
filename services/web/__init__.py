"""``anime-web``: a page (and a JSON API) to watch the running system in a browser.

It holds no state of its own: it asks the dispatcher for the same status document as
``anime-status --json`` (over ZeroMQ, never the database) and hands it to every open
page through server-sent events, one request per heartbeat however many pages are
open. Modules: ``access`` (who may do what: pure decisions), ``overview`` (the one-line
state of the header), ``feed`` (the shared status poll), ``controls`` (the operator
requests, waiting for issue 18's control endpoint), ``server`` (aiohttp: routes, SSE).
"""
