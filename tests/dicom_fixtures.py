"""DICOM whole-slide images written by a real DICOM writer (wsidicom's `WsiDicom.save`), from a tifffile pyramid.

The pyramid is written as a generic (zlib, lossless) TIFF by slide_fixtures.write_slide and read back page by page
with tifffile; each page becomes one VOLUME instance (tiled, JPEG baseline or uncompressed), plus a LABEL instance.
wsidicom fills in the DICOM modules from its metadata model, encodes the frames and writes one `.dcm` per instance:
pip packages only.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
from slide_fixtures import SyntheticSlide, write_slide


def _wsidicom_classes():
    """ImageData and Source over in-memory levels (defined on first use: wsidicom is imported only when needed)."""
    from wsidicom import ImageData
    from wsidicom.geometry import Size, SizeMm
    from wsidicom.source import Source

    class LevelData(ImageData):
        """One pyramid level held as an RGB array, served as tiles of `tile` pixels (white past the edge)."""

        def __init__(self, rgb: np.ndarray, tile: int, mpp: float, encoder):
            self.rgb, self.tile, self.mpp = rgb, tile, mpp
            super().__init__(encoder)

        transfer_syntax = property(lambda self: self.encoder.transfer_syntax)
        image_size = property(lambda self: Size(self.rgb.shape[1], self.rgb.shape[0]))
        tile_size = property(lambda self: Size(self.tile, self.tile))
        pixel_spacing = property(lambda self: SizeMm(self.mpp / 1000, self.mpp / 1000))
        imaged_size = property(lambda self: None)
        samples_per_pixel = property(lambda self: 3)
        photometric_interpretation = property(lambda self: self.encoder.photometric_interpretation)
        bits = property(lambda self: 8)
        image_coordinate_system = property(lambda self: None)
        thread_safe = property(lambda self: True)
        lossy_compression = property(lambda self: None)
        transcoder = property(lambda self: None)

        def get_decoded_tile(self, tile_point, z, path, cache=True):
            t = self.tile
            out = np.full((t, t, 3), 255, np.uint8)
            part = self.rgb[tile_point.y * t : (tile_point.y + 1) * t, tile_point.x * t : (tile_point.x + 1) * t]
            out[: part.shape[0], : part.shape[1]] = part
            return out

        def get_encoded_tile(self, tile, z, path):
            return self.encoder.encode(self.get_decoded_tile(tile, z, path))

    class PyramidSource(Source):
        """A wsidicom Source with one VOLUME instance per level."""

        def __init__(self, levels: list[np.ndarray], mpp: float, tile: int, encoder, base_dataset):
            from wsidicom import WsiInstance
            from wsidicom.metadata import ImageType

            super().__init__()
            self._base = base_dataset
            self._levels = [
                WsiInstance.create_instance(
                    LevelData(rgb, tile, mpp * 2**i, encoder), copy.deepcopy(base_dataset), ImageType.VOLUME, i
                )
                for i, rgb in enumerate(levels)
            ]

        @property
        def base_dataset(self):
            from wsidicom import WsiDataset

            return WsiDataset(copy.deepcopy(self._base))

        level_instances = property(lambda self: self._levels)
        label_instances = property(lambda self: [])
        overview_instances = property(lambda self: [])
        thumbnail_instances = property(lambda self: [])
        annotation_instances = property(lambda self: [])

        def close(self) -> None:
            pass

    return PyramidSource


def _base_dataset():
    """The DICOM modules common to a slide's instances, from wsidicom's metadata model (fresh UIDs)."""
    from pydicom.uid import generate_uid
    from wsidicom.metadata import (
        Equipment,
        Image,
        ImageType,
        Label,
        OpticalPath,
        Patient,
        Pyramid,
        Series,
        Slide,
        SlideSample,
        Study,
        WsiMetadata,
    )
    from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema

    metadata = WsiMetadata(
        study=Study(uid=generate_uid()),
        series=Series(uid=generate_uid(), number=1),
        patient=Patient(),
        equipment=Equipment(),
        slide=Slide(identifier="slide", samples=[SlideSample(identifier="sample", uid=generate_uid())]),
        pyramid=Pyramid(image=Image(), optical_paths=[OpticalPath(identifier="0")], uid=generate_uid()),
        label=Label(),
        frame_of_reference_uid=generate_uid(),
        dimension_organization_uids=[generate_uid()],
    )
    return WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)


def tiff_levels(path) -> list[np.ndarray]:
    """The pyramid levels of a generic pyramidal TIFF (level 0, then the reduced-resolution pages)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


def write_dicom(
    folder,
    slide: SyntheticSlide,
    slide_mpp: float = 0.25,
    *,
    levels: int = 2,
    tile: int = 256,
    compression: str = "jpeg",
    label: bool = True,
) -> list[Path]:
    """Write `slide` as one DICOM series into `folder` (which may hold other series): a tifffile pyramid of `levels`
    reductions converted by wsidicom, one instance per level plus a label. Returns the instance files, level 0
    first."""
    from PIL import Image as PILImage
    from wsidicom import WsiDicom
    from wsidicom.codec import Encoder, JpegSettings, NumpySettings

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = JpegSettings(quality=90) if compression == "jpeg" else NumpySettings()
    with tempfile.TemporaryDirectory() as scratch:
        tiff = write_slide(
            Path(scratch) / "pyramid.tif", slide, slide_mpp, compression="zlib", levels=levels, tile=tile
        )
        source = _wsidicom_classes()(
            tiff_levels(tiff), slide_mpp, tile, Encoder.create_for_settings(settings), _base_dataset()
        )
        out = Path(scratch) / "series"  # wsidicom writes into an empty folder only
        with WsiDicom(source, True) as wsi:
            wsi.save(out, workers=1, label=PILImage.new("RGB", (120, 60), (20, 160, 40)) if label else None)
        written = []
        for path in sorted(out.glob("*.dcm"), key=lambda p: -p.stat().st_size):
            written.append(folder / path.name)
            shutil.move(path, written[-1])
    return written


def series_uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def level0(paths: list[Path]) -> Path:
    """The level-0 instance of a series (the one its slide's uri names)."""
    import pydicom

    def pixels(p):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        return int(ds.TotalPixelMatrixColumns) * int(ds.TotalPixelMatrixRows) if "VOLUME" in ds.ImageType else -1

    return max(paths, key=pixels)
