"""Which part of each year a run's time series covers (config ``period``) and which Sentinel-1
orbit directions it keeps (config ``fetch.s1_orbit_state``): the reference's START_TIME_OVERRIDE /
END_TIME_OVERRIDE and S1_ORBIT_STATE (UPSTREAM.md §1.1, §1.4).

A period is a pair of month-day bounds applied to every year of the run. The workflow makes one
product per tile and calendar year, and a day of year is the ordinal within the date's own year (as
the reference computes it), so a period lies within one year: start <= end. The reference's
overrides are full dates of its single YEAR; the config accepts those too (YYYY-MM-DD, for a single
year) and keeps their month-days.

A period's or an orbit filter's embeddings are not the full-year product. Each stack records both
(``stack.Preprocessing``: ``period``, ``s1_orbit_state``), the outputs' provenance follows, and the
geotessera dataset variant gets a suffix (``variant_of``). geotessera's layout has no place for a
period in its paths (``{year}/grid_X_Y/``), so an output or work directory holds one kind of time
series: ``claim_directories`` records the first run's (``layout.TIME_SERIES_FILE``) and refuses a
run that asks for another.

Importing this module is cheap (no numpy): the Snakefile uses it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tessera.errors import UserError
from tessera.io import atomic_path

# The reference's S1_ORBIT_STATE: both, or one direction.
ALL_ORBITS = "both"
S1_ORBIT_DIRECTIONS = ("ascending", "descending")


def orbit_of(properties: Mapping) -> str:
    """An S1 item's orbit direction from its STAC properties, lower-cased (feeds differ in case);
    anything but ascending or descending is unusable."""
    return str(properties.get("sat:orbit_state", "")).lower()


def kept_orbits(s1_orbit_state: str) -> tuple[str, ...]:
    """The orbit directions a time series of ``s1_orbit_state`` (both, ascending, descending) takes."""
    return S1_ORBIT_DIRECTIONS if s1_orbit_state == ALL_ORBITS else (s1_orbit_state,)


@dataclass(frozen=True, order=True)
class MonthDay:
    month: int
    day: int

    def __str__(self) -> str:
        return f"{self.month:02d}-{self.day:02d}"

    def of(self, year: int) -> dt.date:
        try:
            return dt.date(year, self.month, self.day)
        except ValueError:
            raise UserError(f"period day {self} does not exist in {year}: give days every year of the run has") from None


@dataclass(frozen=True)
class DateRange:
    """The UTC dates a search covers, both ends included."""

    first: dt.date
    last: dt.date

    @classmethod
    def whole_year(cls, year: int) -> DateRange:
        return cls(dt.date(year, 1, 1), dt.date(year, 12, 31))

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.first, dt.time.min, dt.timezone.utc)

    @property
    def end(self) -> dt.datetime:
        """The last instant of ``last``."""
        return dt.datetime.combine(self.last, dt.time.max, dt.timezone.utc)

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def __str__(self) -> str:
        if self == DateRange.whole_year(self.first.year):
            return str(self.first.year)
        return f"{self.first.isoformat()}..{self.last.isoformat()}"


@dataclass(frozen=True)
class Period:
    """Month-day bounds, both included, applied to every year: written ``MM-DD/MM-DD``."""

    start: MonthDay
    end: MonthDay

    @classmethod
    def parse(cls, text: str) -> Period:
        """From ``MM-DD/MM-DD`` (as ``str`` writes it; recorded in the stacks and on the command line)."""
        match = re.fullmatch(r"(\d{2})-(\d{2})/(\d{2})-(\d{2})", text)
        if match is None:
            raise UserError(f"period {text!r} is not MM-DD/MM-DD: give e.g. 04-01/09-30")
        start_month, start_day, end_month, end_day = map(int, match.groups())
        period = cls(MonthDay(start_month, start_day), MonthDay(end_month, end_day))
        for bound in (period.start, period.end):
            try:
                dt.date(2000, bound.month, bound.day)  # a leap year: every day that exists in some year
            except ValueError:
                raise UserError(f"period {text!r}: {bound} does not exist in any year: give MM-DD dates") from None
        if (period.end.month, period.end.day) < (period.start.month, period.start.day):
            raise UserError(f"period {text!r} ends before it starts: a period lies within one calendar year")
        return period

    def __str__(self) -> str:
        return f"{self.start}/{self.end}"

    @property
    def whole_year(self) -> bool:
        return self == WHOLE_YEAR

    def dates(self, year: int) -> DateRange:
        return DateRange(self.start.of(year), self.end.of(year))


WHOLE_YEAR = Period(MonthDay(1, 1), MonthDay(12, 31))


def _bound(config_key: str, value: object, years: list[int]) -> tuple[MonthDay, int | None]:
    """A period bound as a month-day, and its year where the config gave a full date."""
    text = value.isoformat() if isinstance(value, dt.date) else str(value)
    match = re.fullmatch(r"(?:(\d{4})-)?(\d{2})-(\d{2})", text)
    if match is None:
        raise UserError(f"config key '{config_key}': {text!r} is not a date: give MM-DD (every year) or YYYY-MM-DD")
    year, month, day = (int(part) if part else None for part in match.groups())
    for checked in [year] if year else years:
        try:
            dt.date(checked, month, day)
        except ValueError:
            if (month, day) == (2, 29):
                raise UserError(f"config key '{config_key}': {text!r} is not a day of {checked}: give 02-28 or 03-01 "
                                "(02-29 only when every year of the run is a leap year)") from None
            raise UserError(f"config key '{config_key}': {text!r} is not a day of the calendar: "
                            "give a valid date") from None
    return MonthDay(month, day), year


def period_of_config(period: dict | None, years: list[int]) -> Period:
    """The validated period of the config's ``period`` mapping (start, end) for the run's ``years``;
    WHOLE_YEAR without one. Raises a one-line UserError naming the key and the fix."""
    if period is None:
        return WHOLE_YEAR
    (start, start_year), (end, end_year) = (_bound(f"period.{key}", period[key], years) for key in ("start", "end"))
    if (start_year is None) != (end_year is None):
        raise UserError("config key 'period': give start and end alike, both MM-DD (every year) or both YYYY-MM-DD")
    if start_year is not None:
        if len(years) > 1:
            raise UserError(f"config key 'period': full dates need a single year, the run has {len(years)}: "
                            "give month-days MM-DD, applied to every year")
        for key, year in (("start", start_year), ("end", end_year)):
            if year != years[0]:
                raise UserError(f"config key 'period.{key}': {period[key]} is outside year {years[0]}: "
                                f"give a date of {years[0]} (a period lies within the year it embeds)")
    if end < start:
        raise UserError(f"config key 'period': end {end} is before start {start}: give start <= end "
                        "(a period lies within one calendar year)")
    return Period(start, end)


def describe(period: Period, s1_orbit_state: str) -> str:
    """The time series in words, e.g. 'the whole year, both S1 orbit directions'."""
    when = "the whole year" if period.whole_year else f"{period.start} to {period.end} of the year"
    orbits = "both S1 orbit directions" if s1_orbit_state == ALL_ORBITS else f"S1 {s1_orbit_state} passes only"
    return f"{when}, {orbits}"


def variant_of(variant: str, period: Period, s1_orbit_state: str) -> str:
    """The geotessera dataset variant of embeddings of this time series: the configured one for the
    whole year and both orbits, else with the period and the orbit appended (``local_0401-0930``,
    ``local_descending``), so that geotessera never takes them for a full-year product."""
    suffix = "" if period.whole_year else f"_{str(period.start).replace('-', '')}-{str(period.end).replace('-', '')}"
    if s1_orbit_state != ALL_ORBITS:
        suffix += f"_{s1_orbit_state}"
    return variant + suffix


# --- one kind of time series per directory -------------------------------------------------------

def _held_by(directory: Path, record: Path) -> tuple[Period, str] | None:
    from tessera.layout import EMBEDDINGS_DIR, Results  # numpy: only where a run starts

    if record.exists():
        try:
            held = json.loads(record.read_text())
            return Period.parse(held["period"]), held["s1_orbit_state"]
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            raise UserError(f"{record} is damaged ({type(exc).__name__}: {exc}): it records which time series "
                            f"{directory} holds; restore it, or delete it if that is a whole year of both orbits") from None
    # Outputs (a sidecar, tiles) or work (year folders) written before periods existed are of whole
    # years, both orbits.
    if directory.is_dir() and (Results(directory).metadata.exists() or (directory / EMBEDDINGS_DIR).is_dir() or any(
            entry.is_dir() and re.fullmatch(r"\d{4}", entry.name) for entry in directory.iterdir())):
        return WHOLE_YEAR, ALL_ORBITS
    return None


def claim_directories(directories: Iterable[tuple[str, str | Path]], period: Period, s1_orbit_state: str, *,
                      write: bool) -> None:
    """Refuse a run whose time series differs from the one its output or work directory holds
    (``directories``: (config key, path) pairs); with ``write``, record this run's in a directory
    that records none yet."""
    from tessera.layout import TIME_SERIES_FILE

    for key, directory in directories:
        directory = Path(directory)
        record = directory / TIME_SERIES_FILE
        held = _held_by(directory, record)
        if held is not None and held != (period, s1_orbit_state):
            raise UserError(f"{key} {str(directory)!r} holds embeddings of {describe(*held)}; this config asks for "
                            f"{describe(period, s1_orbit_state)}: give the run its own output_dir and work_dir "
                            f"(or delete {directory})")
        if write and not record.exists():
            directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(record) as tmp:
                tmp.write_text(json.dumps({"period": str(period), "s1_orbit_state": s1_orbit_state}) + "\n")
