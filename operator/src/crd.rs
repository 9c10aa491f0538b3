//! KmeshConfig CRD (being written).
