"""`dvc plots show` writes a page that renders with no network: its chart libraries are in the page.

The project's .dvc/config points DVC at .dvc/offline_plots.html (built by
scripts/build_offline_plots_template.py), a copy of DVC's page with vega, vega-lite and vega-embed
inlined. A throwaway DVC project with the same setting and a loss log shows that the page DVC writes
asks nothing of the network, and, where Chromium is installed, that it draws the curve with every
host name unresolvable, where DVC's default page (its libraries on a CDN) draws nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from configobj import ConfigObj

from conftest import REPO, run

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)

# Written into a copy of the page: once every chart's canvas has coloured pixels (the curve; axes and
# grid are grey), or after 4 s, record how many each has, for --dump-dom to show.
INK_PROBE = """<script>
(function poll(n) {
  const counts = Array.from(document.querySelectorAll("canvas.marks"), (c) => {
    const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let k = 0;
    for (let i = 0; i < px.length; i += 4)
      if (px[i + 3] > 0 && Math.max(px[i], px[i + 1], px[i + 2]) - Math.min(px[i], px[i + 1], px[i + 2]) > 60) k++;
    return k;
  });
  if ((counts.length && counts.every((k) => k > 0)) || n >= 40) document.body.setAttribute("data-ink", counts.join(","));
  else setTimeout(() => poll(n + 1), 100);
})(0);
</script>
</body>"""


def _template_setting() -> str:
    return ConfigObj(str(REPO / ".dvc" / "config"))["plots"]["html_template"]


@pytest.fixture
def plots_project(tmp_path: Path) -> Path:
    """A git + DVC project with the repo's plots page setting and one loss log, declared as in dvc.yaml."""
    project = tmp_path / "project"
    log = project / "reports" / "train" / "pretrain" / "log.csv"
    log.parent.mkdir(parents=True)
    rows = [f"{step},{1.2 + 6.0 * 0.93 ** step + 0.05 * (step % 3):.4f}" for step in range(60)]
    log.write_text("step,loss\n" + "\n".join(rows) + "\n")
    (project / "dvc.yaml").write_text(
        "plots:\n  - reports/train/pretrain/log.csv:\n      x: step\n      y: loss\n"
    )
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    setting = _template_setting()
    shutil.copy(REPO / ".dvc" / setting, project / ".dvc" / setting)
    run(["dvc", "config", "plots.html_template", setting], project)
    return project


def _remote_loads(html: str) -> list[str]:
    """Tags that would load something from another host: scripts, stylesheets, images, frames."""
    return re.findall(
        r"<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//[^\s\"'>]+",
        html, flags=re.IGNORECASE,
    )


def _chromium(page: Path, profile: Path, *args: str) -> str:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no host name resolves: as good as no network
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _ink(page: Path, profile: Path) -> list[int]:
    """Coloured pixels drawn in each chart of `page` (a copy of it, with INK_PROBE added)."""
    probe = page.with_name("probe.html")
    head, _, tail = page.read_text(encoding="utf-8").rpartition("</body>")  # the page's, not one in vega-embed's code
    probe.write_text(head + INK_PROBE + tail, encoding="utf-8")
    dom = _chromium(probe, profile, "--dump-dom")
    found = re.search(r'data-ink="([\d,]*)"', dom)
    assert found, dom[-2000:]
    return [int(k) for k in found.group(1).split(",") if k]


def test_repo_template_inlines_the_chart_libraries():
    page = (REPO / ".dvc" / _template_setting()).read_text(encoding="utf-8")
    assert "{plot_divs}" in page
    assert "{scripts}" not in page, "DVC would put its CDN <script> tags there"
    assert not _remote_loads(page)
    for library in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"<script>/* {library}" in page


def test_dvc_plots_show_renders_offline(plots_project: Path, tmp_path: Path):
    out = run(["dvc", "plots", "show"], plots_project).stdout
    page = plots_project / "dvc_plots" / "index.html"
    assert page.as_uri() in out
    html = page.read_text(encoding="utf-8")
    assert not _remote_loads(html), _remote_loads(html)
    assert "cdn.jsdelivr.net" not in html
    assert "vegaEmbed('#reports_train_pretrain_log_csv'" in html

    if CHROMIUM is None:
        pytest.skip("no chromium to render the page with (apt-get install chromium)")
    dom = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert re.search(r'<div id="reports_train_pretrain_log_csv" class="vega-embed[^"]*"', dom), dom[-2000:]
    assert re.search(r'<(canvas|svg)\b[^>]*class="marks"', dom), dom[-2000:]
    ink = _ink(page, tmp_path / "profile")
    assert len(ink) == 1 and ink[0] > 200, ink  # the curve is drawn, not just an empty chart

    screenshot = tmp_path / "plots.png"
    _chromium(page, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1000,800")
    assert screenshot.stat().st_size > 5000

    # Control: DVC's default page, from the same project and browser, draws nothing (its CDN is out of reach).
    run(["dvc", "config", "--unset", "plots.html_template"], plots_project)
    run(["dvc", "plots", "show", "-o", "default_plots"], plots_project)
    default_page = plots_project / "default_plots" / "index.html"
    assert _remote_loads(default_page.read_text(encoding="utf-8"))
    assert _ink(default_page, tmp_path / "profile") == []
