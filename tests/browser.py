"""The system Chromium, headless, driven over the DevTools protocol (aiohttp's websocket client): enough to open
a page, wait for what a user would see, click, and take a screenshot. No tests here.

Chromium listens on 127.0.0.1 only, with its own profile in a folder of the test; `stop()` ends its process
group.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from procs import stop_group


def chromium_path() -> str | None:
    """The system Chromium (Debian's `chromium` package), if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """A headless Chromium of its own profile folder; `page()` opens a tab."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 800) -> None:
        self.profile = profile
        profile.mkdir(parents=True, exist_ok=True)
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("Chromium is not installed (Debian: apt-get install -y chromium)")
        self.log = open(profile.parent / "chromium.log", "w")
        self.proc = subprocess.Popen(
            [
                exe,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("Chromium did not start:\n" + (profile.parent / "chromium.log").read_text()[-2000:])
            time.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])

    def stop(self) -> None:
        stop_group(self.proc, grace=5)
        self.log.close()

    async def page(self) -> Page:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as resp:
                targets = await resp.json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(url, max_msg_size=0)
        page = Page(session, ws)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page


class Page:
    """One tab: navigate, evaluate JavaScript, wait for a condition, click by text, screenshot."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = await self.ws.receive(timeout=60)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed ({msg.type})")
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def eval(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails'].get('text')}: {expression[:200]}")
        return result["result"].get("value")

    async def text(self) -> str:
        return await self.eval("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; on timeout, the page's text is in the error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.5)
        raise TimeoutError(
            f"waited {timeout:.0f} s for {what or expression}; the page shows:\n{(await self.text())[:3000]}"
        )

    async def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        js = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        await self.wait_for(f"document.body && {js}", timeout, what=f"the text {needles}")
        return await self.text()

    async def click_text(
        self, text: str, selector: str = "a, button, [role=button], [role=treeitem], span, div"
    ) -> None:
        """Click the innermost element showing exactly `text`."""
        clicked = await self.eval(
            f"""(() => {{
                const all = [...document.querySelectorAll({json.dumps(selector)})]
                    .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
                const inner = all.filter(e => !all.some(o => o !== e && e.contains(o)));
                if (!inner.length) return false;
                inner[0].click();
                return true;
            }})()"""
        )
        if not clicked:
            raise RuntimeError(f"nothing to click shows {text!r}; the page shows:\n{(await self.text())[:2000]}")

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
