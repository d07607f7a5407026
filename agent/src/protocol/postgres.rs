//! postgres wire protocol parser (in progress).
