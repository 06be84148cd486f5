"""The HTTP floor: a Starlette endpoint that returns a constant, under the same uvicorn setup."""

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = b'{"probability":0.5}'


async def constant(request):  # type: ignore[no-untyped-def]
    await request.body()
    return Response(BODY, media_type="application/json")


app = Starlette(routes=[Route("/v1/predict", constant, methods=["POST"])])
