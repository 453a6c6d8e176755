"""The volume reader chain: one entry point that picks a format reader by what the file is.

- :mod:`.base`: a reader's interface, the header every reader reports, and :class:`~.base.ReadLimits` (the caps
  checked against that header before any image data is read or decompressed).
- :mod:`.nifti` (.nii, .nii.gz) and :mod:`.mha` (MetaImage): one small reader class per format.
- :mod:`.inflate`: a `.nii.gz` on disk inflated whole into the size its header declares (uploads stream).
- :mod:`.dicom` (a DICOM CT series: a folder, a .zip, or one Enhanced CT file), with :mod:`.dicom_series` (which
  images make the volume), :mod:`.dicom_geometry` (slice order, spacing, tilt, the uniform grid) and
  :mod:`.dicom_zip` (archive members, every trap refused before inflating).
- :mod:`.orientation`: reorientation of any reader's voxels to one canonical (S, A, R) order.
- :mod:`.volume`: what a read returns (`Volume` in HU, `RawVolume` with the rescale still to apply).
- :mod:`.chain`: the registry of readers and `read_volume` / `read_raw_volume` / `read_header`.

The public names are exported by :mod:`ctplatform.data`.
"""
