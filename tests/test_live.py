"""The live suite: ``tessera check-source`` against the real Planetary Computer, Earth Search and
ASF for one small tile. Run with ``pytest -m live``; excluded from the default run, and skipped
with the reason when there is no network (or, for ASF, no Earthdata credentials)."""

import io
import socket

import pytest
from shapely import box

from tessera.grid import roi_in_tile, tiles_for_geometry, work_window
from tessera.sources import open_source
from tessera.sources.check import check_source

pytestmark = pytest.mark.live

BBOX = (5.998, 52.040, 6.002, 52.042)
YEAR = 2024
TILE = next(tile for tile, _ in tiles_for_geometry(box(*BBOX)) if tile.epsg == 32632)
WINDOW = work_window(TILE, roi_in_tile(TILE, box(*BBOX)))


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("name, hosts", [
    ("mpc", ("planetarycomputer.microsoft.com",)),
    ("aws", ("earth-search.aws.element84.com", "cmr.earthdata.nasa.gov", "datapool.asf.alaska.edu")),
])
def test_check_source_against_the_real_services(name, hosts):
    unreachable = [host for host in hosts if not _reachable(host)]
    if unreachable:
        pytest.skip(f"no network access to {', '.join(unreachable)}")
    if name == "aws":
        from tessera.sources import earthdata

        if earthdata.credentials_kind() is None:
            pytest.skip("no Earthdata Login credentials (EARTHDATA_TOKEN, EARTHDATA_USERNAME/PASSWORD, "
                        "~/.edl_bearer_token or ~/.netrc)")
    out = io.StringIO()
    with open_source(name) as source:
        report = check_source(source, TILE, WINDOW, YEAR, file=out)
    assert report.ok, out.getvalue()
    assert report.scenes["S2"] > 20 and report.scenes["S1"] > 10, out.getvalue()
