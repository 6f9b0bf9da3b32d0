"""Reading volumes (NIfTI, DICOM, .npy) and the preprocessing that weights expect. Imports networks at most."""
