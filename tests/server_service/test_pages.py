"""The operator pages: Swagger UI, ReDoc and the dashboard load nothing from another host,
and the dashboard's answers forbid it with a Content-Security-Policy."""

from __future__ import annotations

import re

from tests.server_service.helpers import TestClient

#: any absolute URL in a page or script that a browser would fetch
_FOREIGN = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def test_docs_and_redoc_load_their_assets_from_this_server(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        answer = client.get(page)
        assert answer.status_code == 200
        assert not _FOREIGN.search(answer.text), page
        assert "cdn.jsdelivr.net" not in answer.text and "fonts.googleapis" not in answer.text
        assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
        for asset in re.findall(r"""(?:src|href)=["']?(/docs-assets/[^"' >]+)""", answer.text):
            got = client.get(asset)
            assert got.status_code == 200 and len(got.content) > 0, asset
    swagger = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in swagger
    assert '"persistAuthorization": false' in swagger  # the token is not written to storage


def test_the_dashboard_is_served_from_the_package_with_a_strict_policy(
    client: TestClient,
) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert not _FOREIGN.search(page.text)
    assets = re.findall(r"""(?:src|href)="(/ui/(?:assets|common)/[^"]+)""", page.text)
    assert {"/ui/common/common.js", "/ui/common/style.css", "/ui/assets/dashboard.js"} <= set(
        assets
    )
    for asset in assets:
        got = client.get(asset)
        assert got.status_code == 200, asset
        # the SVG namespace is a name, not a place a browser goes to
        text = got.text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text, asset
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui"
