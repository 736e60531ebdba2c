"""TCGA-LIHC's DICOM handling on series written here slice by slice (pydicom), each with one defect real TCIA
downloads have: several studies of one patient, broken slice stacks, scouts and dose reports, objects without
pixel data, macOS junk folders. Every check reads real DICOM files through the converter's own functions."""
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nnunet_liver_ext.dataset_conversion import tcga_lihc
from nnunet_liver_ext.dataset_conversion.common import ConversionError, IncompleteCaseError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
NEEDED = ["arterial", "portal_venous", "delayed"]


def write_series(folder, description, positions, study="1.2.3", study_date="20050101", time="100000",
                 orientation=AXIAL, size=4):
    """One CT series: a slice per position (ImagePositionPatient), 4x4 pixels."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k, position in enumerate(positions):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesDescription, ds.SeriesInstanceUID = "CT", description, series_uid
        ds.StudyInstanceUID, ds.StudyDate, ds.AcquisitionTime = study, study_date, time
        ds.PatientID, ds.InstanceNumber = "P", k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [float(v) for v in position], orientation
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((size, size), 1000 + k, np.int16).tobytes()
        pydicom.dcmwrite(folder / f"1-{k + 1:03d}.dcm", ds, enforce_file_format=True)
    return folder


def stack(n=5, spacing=2.0):
    return [(0.0, 0.0, spacing * k) for k in range(n)]


def info(folder):
    (series,) = tcga_lihc.scan_patient(folder, "P")
    return series


@pytest.mark.parametrize("positions, words", [
    ([(0, 0, z) for z in (0, 2, 4, 6, 10, 12)], "uneven slice spacing (4 mm between slices 3 and 4"),
    ([(0, 0, z) for z in (0, 2, 4, 0, 2, 4)], "two slices at one position"),
    ([(0.5 * k, 0, 2.0 * k) for k in range(5)], "a gantry tilt"),
])
def test_a_broken_slice_stack_is_refused_naming_the_series(tmp_path, positions, words):
    """ITK stacks each of these at a mean spacing and warns on stderr only."""
    folder = write_series(tmp_path / "P" / "s" / "a", "ARTERIAL", positions)
    with pytest.raises(ConversionError, match="ARTERIAL") as error:
        tcga_lihc.read_series(info(tmp_path / "P"), "P")
    assert words in str(error.value) and str(folder) in str(error.value)


def test_an_even_stack_in_any_file_order_reads(tmp_path):
    write_series(tmp_path / "P" / "s" / "a", "ARTERIAL", stack()[::-1])
    image = tcga_lihc.read_series(info(tmp_path / "P"), "P")
    assert image.GetSize() == (4, 4, 5) and image.GetSpacing()[2] == pytest.approx(2.0)


def test_phases_of_different_studies_are_never_mixed(tmp_path):
    """2005: all three phases; 2007: a longer arterial series and a portal venous one. Before, each phase took
    its longest series, so the case mixed the two dates."""
    patient = tmp_path / "P"
    for phase, time in (("ARTERIAL", "100000"), ("PORTAL VENOUS", "100100"), ("DELAYED", "100300")):
        write_series(patient / "2005" / phase, phase, stack(6), study="1.1", study_date="20050101", time=time)
    write_series(patient / "2007" / "a", "ARTERIAL", stack(8), study="1.2", study_date="20070101", time="100000")
    write_series(patient / "2007" / "pv", "PORTAL VENOUS", stack(4), study="1.2", study_date="20070101",
                 time="100100")
    series, notes = tcga_lihc.split_by_study(tcga_lihc.scan_patient(patient, "P"), "P", {}, NEEDED)
    chosen, _ = tcga_lihc.assign_phases(series, "P", {}, NEEDED)
    assert {s.folder.split("/")[-2] for s in chosen.values()} == {"2005"}
    assert "2 studies: used study 1.1 (20050101)" in notes[0] and "the only study with every needed phase" in notes[0]


def test_no_study_with_every_phase_is_an_incomplete_case(tmp_path):
    patient = tmp_path / "P"
    write_series(patient / "2005" / "a", "ARTERIAL", stack(), study="1.1", study_date="20050101")
    write_series(patient / "2007" / "pv", "PORTAL VENOUS", stack(), study="1.2", study_date="20070101")
    write_series(patient / "2007" / "d", "DELAYED", stack(), study="1.2", study_date="20070101", time="100300")
    with pytest.raises(IncompleteCaseError, match=r"no single study has every needed phase.*phases of different "
                                                  r"dates are never mixed"):
        tcga_lihc.split_by_study(tcga_lihc.scan_patient(patient, "P"), "P", {}, NEEDED)


def test_a_scout_or_dose_report_fills_no_phase(tmp_path):
    assert tcga_lihc.phase_from_description("AP/LAT SCOUT") is None
    assert tcga_lihc.phase_from_description("Dose Report") is None
    patient = tmp_path / "P"
    write_series(patient / "s" / "a", "ARTERIAL", stack(), time="100000")
    write_series(patient / "s" / "pv", "PORTAL VENOUS", stack(), time="100100")
    write_series(patient / "s" / "dose", "Screen 1", [(0, 0, 0)], time="100400")  # one image, no phase name
    chosen, notes = tcga_lihc.assign_phases(tcga_lihc.scan_patient(patient, "P"), "P", {}, NEEDED)
    assert "delayed" not in chosen


def test_objects_without_pixel_data_and_macos_junk_are_ignored(tmp_path):
    patient = tmp_path / "P"
    write_series(patient / "s" / "a", "ARTERIAL", stack())
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID, report.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.67", generate_uid()
    report.Modality, report.SeriesDescription, report.SeriesInstanceUID = "SR", "Dose report", generate_uid()
    report.StudyInstanceUID = "1.2.3"
    (patient / "s" / "sr").mkdir()
    pydicom.dcmwrite(patient / "s" / "sr" / "1-1.dcm", report, enforce_file_format=True)
    (patient / "__MACOSX" / "s" / "a").mkdir(parents=True)
    (patient / "__MACOSX" / "s" / "a" / "._1-001.dcm").write_bytes(b"\x00\x05\x16\x07")
    series = tcga_lihc.scan_patient(patient, "P")
    assert sorted(s.modality for s in series) == ["CT", "SR"]
    _, notes = tcga_lihc.assign_phases(series, "P", {}, NEEDED)
    assert any("ignored SR series 'Dose report'" in n for n in notes)
