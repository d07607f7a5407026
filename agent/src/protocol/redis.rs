//! redis wire protocol parser (in progress).
