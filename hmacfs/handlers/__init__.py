"""Request handlers: each takes (app, exchange, signed_path), raises HTTPError on refusal."""
