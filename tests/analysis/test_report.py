"""The offline HTML report: self-contained, escaped, with a working manifold dropdown (checked in Chromium)."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

from bilae import Autoencoder
from bilae.analysis.registry import AnalysisSettings, run_analyses
from bilae.analysis.session import AnalysisSession
from bilae.report import build_report, render_report, write_report

D, VOCAB = 16, 40
EVIL = "<script>alert(1)</script>"


class Tok:
    """Token i decodes to " w<i>"; token 7 is hostile HTML."""

    def decode(self, ids):
        return "".join(EVIL if i == 7 else f" w{i}" for i in ids)


def fake_batches(n: int = 3, batch: int = 4, length: int = 12, predictions: bool = True) -> list:
    table = torch.randn(VOCAB, D)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, -3:] = False
        extra = ((ids + 1) % VOCAB,) if predictions else ()
        out.append((table[ids], mask, ids, *extra))
    return out


def session(kind: str = "mixed") -> AnalysisSession:
    bottleneck = 1 if kind in ("mixed", "combined") else None
    coder = Autoencoder.from_config(kind, d_model=D, layer=1, expansion=4, bottleneck=bottleneck)
    return AnalysisSession(coder, fake_batches(), Tok())


def report_of(s: AnalysisSession, latents: list[int]):
    """The report of every registered analysis, as the callback and bilae-analyze build it."""
    return build_report(s, latents, run_analyses(s, latents, AnalysisSettings()))


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AnalysisSession, list[int]]:
    torch.manual_seed(0)
    s = session()
    latents = s.choose(n=3, skip=2)
    path = write_report(tmp_path_factory.mktemp("report") / "sub" / "report.html", report_of(s, latents))
    return path, s, latents


def test_report_is_self_contained_and_has_every_section(report_file) -> None:
    path, s, latents = report_file
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", text), "no external scripts"
    bundles = re.findall(r'<script type="text/javascript">(.*?)</script>', text, re.S)
    assert len(bundles) == 1 and "plotly.js v" in bundles[0][:300], "plotly.js inlined exactly once"
    own = text.replace(bundles[0], "")
    assert not re.findall(r"https?://", own), "nothing of ours points at the network"
    assert own.count("Plotly.newPlot") >= 1
    assert 1 < len(text.encode()) / 1e6 < 8, "plotly.js inline once, data compact"
    titles = re.findall(r"<h2>(.*?)</h2>", text)
    assert titles == [
        "Manifolds", "Effective dimension", "Overlaps", "Spectra", "Composite atlas",
        "Max- and min-activating contexts",
    ], titles  # fmt: skip
    # Every section holds what it promises: figures for each shown latent, contexts for each.
    for latent in latents:
        assert f"Overlaps of latent {latent}" in text and f"Spectrum of latent {latent}" in text
        assert f"<b>latent {latent}" in text  # " (negative signal: …)" may follow
    assert text.count('class="plotly-graph-div"') == 1 + 2 * len(latents) + 1, "ged, overlaps, spectra, atlas"
    options = re.findall(r'<option value="(\d+)">latent (\d+) ', text)
    assert [int(o[1]) for o in options] == latents and [o[0] for o in options] == ["0", "1", "2"]
    assert list(path.parent.iterdir()) == [path], "written atomically, no temporary file left"


def test_report_embeds_hover_text_and_escapes_tokens(report_file) -> None:
    path, s, latents = report_file
    text = path.read_text(encoding="utf-8")
    _, hover = s.manifold(latents[0], 2000)
    assert " → " in hover[0] and "[" in hover[0]
    data = re.search(r'<script type="application/json" id="manifold-data">(.*?)</script>', text, re.S)
    assert data is not None
    # The hover text sits in the embedded data (HTML-escaped for plotly, "<" written as \u003c for <script>).
    embedded = html.escape(hover[0]).replace("<", "\\u003c").replace(">", "\\u003e")
    assert embedded in data.group(1)
    assert EVIL not in text, "token text is escaped everywhere"
    assert html.escape(EVIL) in text, "and still shown (in the contexts)"


def test_report_without_bottleneck_says_what_was_skipped() -> None:
    s = session("vanilla")
    latents = s.choose(n=2)
    assert len(latents) == 2
    text = render_report(report_of(s, latents))
    assert text.count("skipped: a &#x27;vanilla&#x27; autoencoder has no bottleneck") == 3
    assert "Spectrum of latent" in text and 'id="manifold-select"' in text


def test_report_without_sample_keeps_weight_analyses() -> None:
    coder = Autoencoder.from_config("mixed", d_model=D, layer=1, expansion=4, bottleneck=1)
    s = AnalysisSession(coder, [], None)
    text = render_report(report_of(s, s.choose(n=2)))
    assert text.count("skipped: no activation sample") == 2, "manifolds and contexts"
    assert "Spectrum of latent" in text and "<option" not in text


# ------------------------------------------------------------------------------------------- in a browser
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
OFFLINE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",  # software WebGL for the 3-D scatter
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,1000",
    "--virtual-time-budget=15000",
]


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    return subprocess.run(
        [CHROMIUM, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes) into rows of pixel bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(b"".join(chunks)), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a, b = line[x - bpp] if x >= bpp else 0, prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for i, v in enumerate(line) if i % 4 != 3))
        prev = line
    return width, height, rows


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_file, tmp_path: Path) -> None:
    path, s, latents = report_file
    # The second manifold, through the same code path as the dropdown (Plotly.react on the chosen view).
    dom = chromium(["--dump-dom", f"{path.as_uri()}#manifold=1"], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = re.search(r'<p id="manifold-status"[^>]*>(.*?)</p>', dom.stdout, re.S)
    assert status is not None, dom.stdout[-2000:]
    tag = status.group(0)
    # Written by the page only after plotly finished drawing: the view shown, a WebGL canvas, the hover text
    # read back from the plotted trace (gd.data[0].hovertext[0]).
    assert 'data-rendered="1"' in tag and re.search(r'data-canvases="[1-9]', tag), tag
    _, hover = s.manifold(latents[1], 2000)
    assert f"latent {latents[1]} " in status.group(1)
    assert html.escape(hover[0], quote=False) in status.group(1), (hover[0], status.group(1))
    assert 'class="main-svg"' in dom.stdout and "gl-container" in dom.stdout

    shot = tmp_path / "report.png"
    result = chromium([f"--screenshot={shot}", path.as_uri()], tmp_path)
    assert shot.is_file(), result.stderr[-2000:]
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1200, 1000)
    # The 3-D plot area (below the title, the summary and the dropdown) holds many distinct colours.
    plot = [rows[y][x * 3 : x * 3 + 3] for y in range(height // 2, height, 4) for x in range(0, width, 4)]
    values = [v for pixel in plot for v in pixel]
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    assert variance > 50 and len(set(plot)) > 30, (variance, len(set(plot)))
