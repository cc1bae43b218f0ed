"""The router's HTTP front (aiohttp): OpenAI JSON in, OpenAI JSON and SSE out.

`protocol.py` parses and checks requests into `ParsedRequest` (pure: bad input raises a typed
error from `router/errors.py`); `responses.py` formats the `Router`'s chunks as completions or
chat completions; `app.py` holds the aiohttp routes, API-key auth, body limits and timeouts,
and answers a typed error with the status `router/errors.py` gives it. Only `app.py` imports
aiohttp. May import `router.service`,
`router.errors` and `router.metrics`; `routing/` never imports this package.
"""
