//! mysql wire protocol parser (in progress).
