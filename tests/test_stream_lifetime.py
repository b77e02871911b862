"""StreamLifetimeMiddleware (serving/limits.py): an event stream that never ends is ended at the
bound, its generator cancelled; every other response passes untouched. No Ray cluster."""
import asyncio

import httpx
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from serving.limits import StreamLifetimeMiddleware

BOUND_S = 0.3
FAREWELL = b'data: {"msg": "close_stream"}\n\n'


def build_app(cleaned: list):
    app = FastAPI()

    @app.get("/forever")
    async def forever():
        async def beats():
            try:
                while True:
                    yield b"event: heartbeat\ndata: {}\n\n"
                    await asyncio.sleep(0.02)
            finally:
                cleaned.append("forever")
        return StreamingResponse(beats(), media_type="text/event-stream")

    @app.get("/late-forever")
    async def late_forever():  # begins only after the bound, as on a loaded replica
        await asyncio.sleep(2 * BOUND_S)
        return await forever()

    @app.get("/short-stream")
    async def short_stream():
        async def two():
            yield b"data: 1\n\n"
            yield b"data: 2\n\n"
        return StreamingResponse(two(), media_type="text/event-stream")

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(3 * BOUND_S)  # longer than the bound, and not a stream
        return PlainTextResponse("done", headers={"x-kept": "yes"})

    app.add_middleware(StreamLifetimeMiddleware, max_lifetime_s=BOUND_S, farewell=FAREWELL)
    return app


def get(app, path):
    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            # ASGITransport returns once the app has finished: without the bound, /forever never would
            return await asyncio.wait_for(client.get(path), timeout=30)
    return asyncio.run(call())


def test_a_stream_that_never_ends_is_ended_at_the_bound_and_its_generator_cancelled():
    cleaned = []
    response = get(build_app(cleaned), "/forever")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content.startswith(b"event: heartbeat\ndata: {}\n\n")
    assert response.content.endswith(FAREWELL)
    assert cleaned == ["forever"]


def test_a_stream_that_begins_after_the_bound_is_ended_as_soon_as_it_begins():
    cleaned = []
    response = get(build_app(cleaned), "/late-forever")
    assert response.content.startswith(b"event: heartbeat\ndata: {}\n\n") or response.content == FAREWELL
    assert response.content.endswith(FAREWELL) and cleaned == ["forever"]


def test_a_stream_that_ends_by_itself_is_untouched():
    response = get(build_app([]), "/short-stream")
    assert response.content == b"data: 1\n\ndata: 2\n\n"


def test_a_slow_ordinary_response_is_never_cut():
    response = get(build_app([]), "/slow")
    assert (response.status_code, response.text, response.headers["x-kept"]) == (200, "done", "yes")


def test_the_page_ends_gradios_heartbeat_stream_with_close_stream(monkeypatch):
    import serving.ui as ui  # Gradio, in-process (test_ui_augmentation imports it too)
    monkeypatch.setattr(ui, "STREAM_LIFETIME_S", BOUND_S)
    app = ui.ui_app(None)  # no backend: nothing here recognises
    response = get(app, "/gradio_api/heartbeat/some-session")  # "data: ALIVE" every 15 s, for ever
    assert response.content.startswith(b"data: ALIVE\n\n")
    assert response.content.endswith(ui.STREAM_END) and b'"close_stream"' in ui.STREAM_END
    assert get(app, "/config").status_code == 200
