"""A small FastAPI app whose routes need a gatehouse device token.

Run: AUTH_ISSUER=https://auth.example.com python3 app.py   (PORT, default 8000; 0 picks
a free port). It prints "listening on http://127.0.0.1:PORT" once it accepts requests.
"""

from __future__ import annotations

import logging
import os
import socket

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, status

from gatehouse_auth import Device, device, live_device

app = FastAPI()


@app.get("/me")
def me(caller: Device = Depends(device)) -> dict:
    """Offline check: fast, but a revoked token still passes until it expires."""
    return {"device_id": caller.id, "token_id": caller.token_id, "expires_at": caller.expires_at}


@app.get("/me/live")
def me_live(caller: Device = Depends(live_device)) -> dict:
    """Introspection: a revoked token, family, device or key is refused at once."""
    return {"device_id": caller.id, "token_id": caller.token_id, "expires_at": caller.expires_at}


@app.get("/devices/{device_id}/notes")
def notes(device_id: str, caller: Device = Depends(device)) -> dict:
    """Authorization is the app's own: a device reads only its own notes (else 403)."""
    if device_id != caller.id:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a device may read only its own notes")
    return {"device_id": device_id, "notes": []}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(os.environ.get("PORT", "8000"))))
    sock.listen(128)  # connections queue from now on, before uvicorn's loop starts
    config = uvicorn.Config(app, log_level="warning")
    server = uvicorn.Server(config)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
