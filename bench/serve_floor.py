"""The cost of Ray Serve's HTTP path alone: an ingress whose POST /predict reads the body and
answers a constant. The serving benchmark measures it beside the real app (--floor)."""
from fastapi import FastAPI, Request
from ray import serve

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Floor:
    @api.post("/predict")
    async def predict(self, request: Request) -> dict:
        await request.body()  # the body travels like the real app's (fetched from the proxy)
        return {"digit": 0}


def build(args: dict | None = None) -> serve.Application:
    return Floor.bind()
