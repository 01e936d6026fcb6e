"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status codes its
clients handle (400, 401, 403, 404, 413, 429 and 503 with ``Retry-After``), and the request body limit.

Messages name the field and the reason; they never carry paths, the run root or an exception's text
(those go to the replica's log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1  # what a client told 429 or 503 waits before trying again
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(HTTPException):
    """An error answer: status, a message for the caller and, where one field is at fault, its name."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        if status in (429, 503):
            headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
        super().__init__(status, message, headers=headers)
        self.param, self.code = param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": code}}


def _field(loc: tuple | list) -> str | None:
    path = [str(part) for part in loc[1:] if not isinstance(part, int)] if loc and loc[0] == "body" else []
    return ".".join(path) or None


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming each bad field and why, without echoing the input (it may be huge or not JSON-able)."""
    problems = exc.errors()
    reasons = [f"{_field(e['loc']) or 'body'}: {e['msg']}" for e in problems]
    first = _field(problems[0]["loc"]) if problems else None
    return JSONResponse(error_body(400, "; ".join(reasons)[:2000], first, "invalid_value"), status_code=400)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None)
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    return JSONResponse(error_body(exc.status_code, message, param, code), status_code=exc.status_code,
                        headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("safetydpo: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body(500, "internal error; the server's log has the details"), status_code=500)


def install(api: FastAPI) -> None:
    """Every error ``api`` answers, in OpenAI's shape."""
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` answers 413 before anything parses it, whether its
    ``Content-Length`` says so or it streams more than that in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            await self._refuse(send, status, f"request body over {self.max_bytes} bytes" if status == 413
                               else "invalid Content-Length")
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ApiError(413, f"request body over {self.max_bytes} bytes", code="body_too_large")
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        response = JSONResponse(error_body(status, message), status_code=status)
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
