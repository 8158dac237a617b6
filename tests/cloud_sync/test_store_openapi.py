"""openapi.json documents every route the store serves, with its methods."""

from __future__ import annotations

import json
from importlib import resources

from cloud_sync.store.app import create_app
from cloud_sync.store.backend import Backend


async def test_every_route_is_in_openapi(backend: Backend) -> None:
    text = resources.files("cloud_sync.store").joinpath("openapi.json").read_text("utf-8")
    paths = json.loads(text)["paths"]
    app = create_app(backend)
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(path, method) for path, item in paths.items() for method in item}
    assert served <= documented, sorted(served - documented)
