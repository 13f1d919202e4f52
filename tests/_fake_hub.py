"""A local stand-in for the Hugging Face Hub's upload API (what `huggingface_hub.HfApi.create_repo` and
`upload_folder` call), recording what it receives; never the real Hub in tests."""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def hub_app(refuse: bool = False) -> FastAPI:
    """The app; `app.state.repos`, `app.state.files` ({repo: {path: bytes}}), `app.state.tokens` record the calls."""
    app = FastAPI()
    app.state.repos, app.state.files, app.state.tokens = [], {}, set()

    @app.post("/api/validate-yaml")
    async def validate(request: Request) -> Any:
        return {"errors": [], "warnings": []}

    @app.post("/api/repos/create")
    async def create(request: Request) -> Any:
        app.state.tokens.add(request.headers.get("authorization"))
        if refuse:
            return JSONResponse({"error": "You are not allowed to create a repo here"}, status_code=403)
        body = await request.json()
        repo = f"{body.get('organization')}/{body['name']}" if body.get("organization") else body["name"]
        private = bool(body.get("private")) or body.get("visibility") == "private"  # older and newer clients
        app.state.repos.append({"repo": repo, "private": private})
        return {"url": f"{str(request.base_url).rstrip('/')}/{repo}", "name": repo}

    @app.post("/api/models/{owner}/{name}/preupload/{revision}")
    async def preupload(owner: str, name: str, revision: str, request: Request) -> Any:
        files = (await request.json())["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    @app.post("/api/models/{owner}/{name}/commit/{revision}")
    async def commit(owner: str, name: str, revision: str, request: Request) -> Any:
        app.state.tokens.add(request.headers.get("authorization"))
        stored = app.state.files.setdefault(f"{owner}/{name}", {})
        for line in (await request.body()).decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        url = f"{str(request.base_url).rstrip('/')}/{owner}/{name}/commit/{'a' * 40}"
        return {"commitUrl": url, "commitOid": "a" * 40, "commitMessage": "distill", "success": True}

    return app
