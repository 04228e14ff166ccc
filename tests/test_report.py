"""`ftcluster report`: a self-contained HTML page whose plots are real PNGs."""

import base64
import re
from html.parser import HTMLParser


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, bytes]] = []
        self.headings: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            match = re.fullmatch(r"data:image/png;base64,(.+)", attrs["src"])
            assert match, "images must be inlined"
            self.images.append((attrs["alt"], base64.b64decode(match.group(1))))
        self._in_heading = tag in ("h1", "h2")

    def handle_data(self, data):
        if self._in_heading and data.strip():
            self.headings.append(data.strip())
        self._in_heading = False


def test_report_has_inlined_png_plots_and_the_comparison(make_job, cli, tmp_path):
    job = make_job("reported", eval={"every": 2, "before_after": True}, training={"max_steps": 6})
    assert cli("train", job, "--no-ray").code == 0
    run = tmp_path / "runs" / "reported"
    result = cli("report", run)
    assert result.code == 0, result
    page = (run / "report.html").read_text()
    parser = Images()
    parser.feed(page)
    assert [alt for alt, _ in parser.images] == ["Loss", "Throughput", "Memory", "Cost over time"]
    for _, data in parser.images:
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert "Base vs fine-tuned" in parser.headings
    assert "val_loss" in page and "cost_usd" in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched


def test_report_of_a_folder_that_is_not_a_run(cli, tmp_path):
    result = cli("report", tmp_path)
    assert result.code == 2 and "no metrics.jsonl" in result.err
