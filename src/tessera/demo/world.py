"""The synthetic world behind the demo scenes: land cover, phenology, weather, reflectance, backscatter.

Everything here is a function of geographic position (lon/lat in degrees), date and seed, never of a
granule's pixel grid. Two granules in different UTM zones that overlap therefore show the same
surface and the same clouds, which is what reprojection and same-day merging downstream must
reproduce. Only sensor noise and SAR speckle are drawn per granule pixel (see ``catalog``).

Spatial patterns are sums of plane waves with seeded directions, wavelengths and phases over local
metric coordinates: smooth, stationary, unit-variance fields that are cheap to evaluate anywhere.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import date
from statistics import NormalDist

import numpy as np

# Metres per degree of latitude, and of longitude at the equator (WGS84, to well under 1 %: the
# fields only need to be smooth and roughly isotropic, not geodetically exact).
_METRES_PER_DEGREE_LAT = 110_574.0
_METRES_PER_DEGREE_LON = 111_320.0


class LandCover(enum.IntEnum):
    CROPLAND = 1
    FOREST = 2
    GRASSLAND = 3
    WATER = 4
    BUILT_UP = 5


# Surface reflectance of the spectral end-members (typical library spectra, rounded). Band order as
# in S2_BANDS. "dry" is senescent vegetation, stubble and leafless branches over litter.
S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
_ENDMEMBERS = {
    "soil": (0.060, 0.080, 0.100, 0.130, 0.160, 0.180, 0.200, 0.210, 0.280, 0.220),
    "green": (0.030, 0.060, 0.030, 0.100, 0.300, 0.380, 0.420, 0.430, 0.200, 0.100),
    "dry": (0.050, 0.070, 0.120, 0.150, 0.180, 0.200, 0.220, 0.240, 0.300, 0.230),
    "water": (0.050, 0.050, 0.030, 0.025, 0.020, 0.015, 0.012, 0.010, 0.005, 0.003),
    "built": (0.090, 0.100, 0.110, 0.130, 0.140, 0.150, 0.160, 0.170, 0.200, 0.180),
    # Thick cloud: bright and flat in the visible/NIR, darker in the SWIR (ice/water absorption).
    "cloud": (0.500, 0.490, 0.480, 0.480, 0.490, 0.500, 0.500, 0.500, 0.330, 0.220),
    "cirrus": (0.300, 0.300, 0.300, 0.300, 0.300, 0.300, 0.300, 0.300, 0.250, 0.200),
}

# Sentinel-2 scene classification (SCL) values used by the demo.
SCL_CLOUD_SHADOW = 3
SCL_VEGETATION = 4
SCL_NOT_VEGETATED = 5
SCL_WATER = 6
SCL_CLOUD_MEDIUM = 8
SCL_CLOUD_HIGH = 9
SCL_THIN_CIRRUS = 10

# Cloud field values above threshold + this margin are cloud cores (SCL 9), below it cloud edges (8).
_CLOUD_CORE_MARGIN = 0.4
_CIRRUS_OPACITY = 0.2
# Shadows get only diffuse skylight.
_SHADOW_FACTOR = 0.3
# A shadow lies away from the sun: with the sun in the south-south-east at the late-morning
# overpass and clouds about 1 km up, the shadow of a cloud at P falls about 300 m north-north-west.
_SHADOW_OFFSET_METRES = (-80.0, 290.0)

_STANDARD_NORMAL = NormalDist()


def metric_xy(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local metric coordinates (metres) of lon/lat, continuous everywhere off the poles."""
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    return lon * _METRES_PER_DEGREE_LON * np.cos(np.radians(lat)), lat * _METRES_PER_DEGREE_LAT


class SmoothField:
    """A seeded random field of position: zero mean, unit variance, features of the given sizes."""

    def __init__(self, rng: np.random.Generator, shortest_m: float, longest_m: float, waves: int = 12):
        wavelengths = np.exp(rng.uniform(math.log(shortest_m), math.log(longest_m), waves))
        directions = rng.uniform(0.0, math.pi, waves)
        self._kx = 2 * np.pi * np.cos(directions) / wavelengths
        self._ky = 2 * np.pi * np.sin(directions) / wavelengths
        self._phase = rng.uniform(0.0, 2 * np.pi, waves)
        # Each sine has variance amplitude**2 / 2, so this amplitude gives a unit-variance sum.
        self._amplitude = math.sqrt(2.0 / waves)

    def at_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        total = np.zeros(np.shape(x), dtype=np.float64)
        for kx, ky, phase in zip(self._kx, self._ky, self._phase):
            total += np.sin(kx * x + ky * y + phase)
        return total * self._amplitude


def _quantile(fraction: float) -> float:
    """Threshold of a unit-variance field above which about ``1 - fraction`` of the area lies."""
    return _STANDARD_NORMAL.inv_cdf(min(max(fraction, 1e-6), 1 - 1e-6))


def _double_logistic(doy, rise: float, fall: float, steepness: float):
    """0 in winter, 1 between ``rise`` and ``fall`` (days of year), smooth in between."""
    return 1 / (1 + np.exp(-(doy - rise) / steepness)) - 1 / (1 + np.exp(-(doy - fall) / steepness))


@dataclass(frozen=True)
class Weather:
    """The sky and ground conditions of one day, the same everywhere in the demo area."""

    cloud_cover: float  # target fraction of cloudy area, 0..1
    cirrus: bool
    soil_moisture: float  # multiplies bare-soil backscatter
    water_vv: float  # wind-roughened open water VV gamma0 (linear)


@dataclass(frozen=True)
class Sky:
    """Clouds over a set of points on one day."""

    cloud_opacity: np.ndarray  # 0 where clear, 0.6..1 inside clouds
    cloud_core: np.ndarray  # bool, thick cloud (SCL 9); other cloudy points are SCL 8
    shadow: np.ndarray  # bool, cloud shadow on a cloud-free point
    cirrus: np.ndarray  # bool, thin cirrus on a cloud- and shadow-free point


@dataclass(frozen=True)
class Place:
    """Points on the ground and what stays the same there all year (computed once per pixel grid)."""

    x: np.ndarray  # metric_xy of the points
    y: np.ndarray
    cover: np.ndarray  # LandCover values, uint8
    sowing_shift: np.ndarray  # crop calendar shift of the field, -1..1 (times 20 days)
    texture: np.ndarray  # fine-scale brightness variation, unit variance


class World:
    """The demo world for one seed: what the surface and the sky look like at any place and day."""

    def __init__(self, seed: int):
        self.seed = seed
        fields = [SmoothField(self.rng("land", index), 150.0, 800.0) for index in range(4)]
        self._water, self._built, self._vegetation, self._sowing = fields
        self._texture = SmoothField(self.rng("texture"), 20.0, 90.0)

    def rng(self, purpose: str, *numbers: int) -> np.random.Generator:
        """A generator seeded by the world's seed, a purpose and numbers (date, orbit...)."""
        # A stable integer per purpose (str hashes are salted per process, so encode the bytes).
        tag = int.from_bytes(purpose.encode(), "little")
        return np.random.default_rng(np.random.SeedSequence([self.seed, tag, *numbers]))

    def place(self, lon: np.ndarray, lat: np.ndarray) -> Place:
        x, y = metric_xy(lon, lat)
        return Place(
            x=x,
            y=y,
            cover=self._land_cover_xy(x, y),
            sowing_shift=np.clip(self._sowing.at_xy(x, y), -1.0, 1.0),
            texture=self._texture.at_xy(x, y),
        )

    def land_cover(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """LandCover values (uint8) at the given points."""
        return self._land_cover_xy(*metric_xy(lon, lat))

    def _land_cover_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        vegetation = self._vegetation.at_xy(x, y)
        cover = np.full(np.shape(x), LandCover.GRASSLAND, dtype=np.uint8)
        cover[vegetation < _quantile(0.45)] = LandCover.CROPLAND
        cover[vegetation > _quantile(0.75)] = LandCover.FOREST
        cover[self._built.at_xy(x, y) > _quantile(0.87)] = LandCover.BUILT_UP
        cover[self._water.at_xy(x, y) > _quantile(0.88)] = LandCover.WATER
        return cover

    def weather(self, day: date) -> Weather:
        rng = self.rng("weather", day.toordinal())
        # 1 in mid-July, 0 in mid-January: more clear days in summer, as in north-west Europe.
        summer = 0.5 * (1 - math.cos(2 * math.pi * (_day_of_year(day) - 15) / 365.25))
        draw = rng.random()
        clear_probability = 0.25 + 0.25 * summer
        overcast_probability = 0.30 - 0.15 * summer
        if draw < clear_probability:
            cloud_cover = 0.0
        elif draw < clear_probability + overcast_probability:
            cloud_cover = 1.0
        else:
            cloud_cover = float(rng.uniform(0.1, 0.7))
        return Weather(
            cloud_cover=cloud_cover,
            cirrus=bool(rng.random() < 0.3),
            soil_moisture=float(rng.uniform(0.75, 1.3)),
            water_vv=float(rng.uniform(0.003, 0.01)),
        )

    def sky(self, place: Place, day: date) -> Sky:
        weather = self.weather(day)
        clouds = SmoothField(self.rng("clouds", day.toordinal()), 300.0, 2000.0)
        threshold = _quantile(1 - weather.cloud_cover) if weather.cloud_cover > 0 else math.inf
        field = clouds.at_xy(place.x, place.y)
        cloudy = field > threshold
        depth = np.clip((field - threshold) / _CLOUD_CORE_MARGIN, 0.0, 1.0)
        opacity = np.where(cloudy, 0.6 + 0.4 * depth, 0.0)
        cloud_at_sun_side = clouds.at_xy(place.x - _SHADOW_OFFSET_METRES[0], place.y - _SHADOW_OFFSET_METRES[1])
        shadow = (cloud_at_sun_side > threshold) & ~cloudy
        if weather.cirrus:
            cirrus_field = SmoothField(self.rng("cirrus", day.toordinal()), 1000.0, 4000.0)
            cirrus = (cirrus_field.at_xy(place.x, place.y) > _quantile(0.6)) & ~cloudy & ~shadow
        else:
            cirrus = np.zeros(place.cover.shape, dtype=bool)
        return Sky(cloud_opacity=opacity, cloud_core=cloudy & (depth >= 1.0), shadow=shadow, cirrus=cirrus)

    def _vegetation_fractions(self, place: Place, doy: int) -> tuple[np.ndarray, np.ndarray]:
        """Fractions of green and of dry vegetation per point (the rest is soil, water or built-up)."""
        cover = place.cover
        green = np.zeros(cover.shape)
        dry = np.zeros(cover.shape)
        crop = cover == LandCover.CROPLAND
        # Crops: sown in spring (±20 days by field), green in early summer, ripening, harvested.
        crop_doy = doy - 20.0 * place.sowing_shift[crop]
        green[crop] = 0.9 * _double_logistic(crop_doy, 120.0, 205.0, 8.0)
        dry[crop] = np.minimum(0.7 * _double_logistic(crop_doy, 195.0, 235.0, 5.0), 1.0 - green[crop])
        forest = cover == LandCover.FOREST
        green[forest] = 0.2 + 0.7 * _double_logistic(doy, 115.0, 295.0, 8.0)
        dry[forest] = 1.0 - green[forest]
        grass = cover == LandCover.GRASSLAND
        green[grass] = 0.5 + 0.35 * _double_logistic(doy, 85.0, 300.0, 15.0)
        dry[grass] = 1.0 - green[grass]
        return green, dry

    def surface_reflectance(self, place: Place, day: date, bands: tuple[str, ...]) -> np.ndarray:
        """Cloud-free surface reflectance, float64 (len(bands), *points shape)."""
        cover = place.cover
        green, dry = self._vegetation_fractions(place, _day_of_year(day))
        soil = np.where((cover == LandCover.WATER) | (cover == LandCover.BUILT_UP), 0.0, 1.0 - green - dry)
        brightness = 1.0 + 0.05 * place.texture
        reflectance = np.empty((len(bands), *cover.shape))
        for index, band in enumerate(bands):
            column = S2_BANDS.index(band)
            value = (
                green * _ENDMEMBERS["green"][column]
                + dry * _ENDMEMBERS["dry"][column]
                + soil * _ENDMEMBERS["soil"][column]
            )
            value[cover == LandCover.WATER] = _ENDMEMBERS["water"][column]
            value[cover == LandCover.BUILT_UP] = _ENDMEMBERS["built"][column]
            reflectance[index] = value * brightness
        return reflectance

    @staticmethod
    def seen_through(surface: np.ndarray, sky: Sky, bands: tuple[str, ...]) -> np.ndarray:
        """Reflectance as the sensor sees the surface through the sky (shadows, cirrus, clouds)."""
        observed = surface * np.where(sky.shadow, _SHADOW_FACTOR, 1.0)
        cirrus = np.where(sky.cirrus, _CIRRUS_OPACITY, 0.0)
        for index, band in enumerate(bands):
            column = S2_BANDS.index(band)
            observed[index] = observed[index] * (1 - cirrus) + cirrus * _ENDMEMBERS["cirrus"][column]
            observed[index] = observed[index] * (1 - sky.cloud_opacity) + sky.cloud_opacity * _ENDMEMBERS["cloud"][column]
        return observed

    def scene_classification(self, place: Place, day: date, sky: Sky) -> np.ndarray:
        """Sen2Cor-like SCL (uint8): the clear-sky class by land cover and greenness, then the sky."""
        red, nir = self.surface_reflectance(place, day, ("B04", "B08"))
        ndvi = (nir - red) / (nir + red)
        scl = np.where(ndvi > 0.45, SCL_VEGETATION, SCL_NOT_VEGETATED).astype(np.uint8)
        scl[place.cover == LandCover.WATER] = SCL_WATER
        scl[place.cover == LandCover.BUILT_UP] = SCL_NOT_VEGETATED
        scl[sky.cirrus] = SCL_THIN_CIRRUS
        scl[sky.shadow] = SCL_CLOUD_SHADOW
        scl[sky.cloud_opacity > 0] = SCL_CLOUD_MEDIUM
        scl[sky.cloud_core] = SCL_CLOUD_HIGH
        return scl

    def backscatter(self, place: Place, day: date, orbit_state: str) -> tuple[np.ndarray, np.ndarray]:
        """Speckle-free VV and VH gamma0 (linear power), float64 arrays shaped like the place."""
        cover = place.cover
        weather = self.weather(day)
        doy = _day_of_year(day)
        green, _ = self._vegetation_fractions(place, doy)
        bare_vv = 0.045 * weather.soil_moisture
        vv = np.empty(cover.shape)
        vh = np.empty(cover.shape)
        crop = cover == LandCover.CROPLAND
        # Crops: soil scattering in winter, volume scattering of the canopy in summer.
        vv[crop] = bare_vv * (1 - green[crop]) + 0.08 * green[crop]
        vh[crop] = 0.006 * (1 - green[crop]) + 0.03 * green[crop]
        forest = cover == LandCover.FOREST
        vv[forest] = 0.10
        vh[forest] = 0.02 * (1 + 0.2 * _double_logistic(doy, 115.0, 295.0, 8.0))
        grass = cover == LandCover.GRASSLAND
        vv[grass] = 0.5 * bare_vv + 0.03 * green[grass]
        vh[grass] = 0.006 + 0.008 * green[grass]
        water = cover == LandCover.WATER
        vv[water] = weather.water_vv
        vh[water] = 0.15 * weather.water_vv
        built = cover == LandCover.BUILT_UP
        # Double bounce off walls and ground.
        vv[built] = 0.35
        vh[built] = 0.045
        # The two passes see the area at different incidence angles.
        geometry = 1.0 if orbit_state == "ascending" else 1.08
        brightness = geometry * (1.0 + 0.1 * place.texture)
        return vv * brightness, vh * brightness


def _day_of_year(day: date) -> int:
    return day.timetuple().tm_yday
