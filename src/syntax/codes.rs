//! The stable error codes of every diagnostic lossc emits. Codes never change
//! meaning once released; tests and users may match on them.

// Syntax and files.
pub const SYNTAX: &str = "LC0001";
pub const EMPTY_FILE: &str = "LC0002";
pub const USE_NOT_FOUND: &str = "LC0003";

// Names.
pub const UNKNOWN_NAME: &str = "LC0101";
pub const DUPLICATE: &str = "LC0102";
pub const RECURSION: &str = "LC0103";
pub const ARITY: &str = "LC0104";
pub const NOT_CALLABLE: &str = "LC0105";
pub const BAD_ARGUMENT: &str = "LC0106";

// Shapes and types.
pub const SHAPE_MISMATCH: &str = "LC0201";
pub const TYPE_MISMATCH: &str = "LC0202";
pub const INDEX_COUNT: &str = "LC0203";
pub const UNKNOWN_EXTENT: &str = "LC0204";
pub const NOT_SCALAR: &str = "LC0205";
pub const NOT_STATIC: &str = "LC0206";
pub const BAD_INDEX: &str = "LC0207";
pub const MISSING_RESULT: &str = "LC0208";

// Parameters.
pub const UNKNOWN_PARAM: &str = "LC0301";
pub const PARAM_TYPE: &str = "LC0302";
pub const MISSING_PARAM: &str = "LC0303";
pub const BAD_CHOICE: &str = "LC0304";
pub const REQUIRE_FAILED: &str = "LC0305";

// Finding a loss.
pub const NO_SUCH_LOSS: &str = "LC0401";
pub const AMBIGUOUS_LOSS: &str = "LC0402";

// Binding tensors at run time.
pub const MISSING_TENSOR: &str = "LC0501";
pub const EXTRA_TENSOR: &str = "LC0502";
pub const TENSOR_SHAPE: &str = "LC0503";
pub const TENSOR_DTYPE: &str = "LC0504";
pub const NON_FINITE: &str = "LC0505";
pub const INDEX_RANGE: &str = "LC0506";
pub const TENSOR_FILE: &str = "LC0507";

// Backends.
/// The chosen backend cannot run here (no CUDA driver, no device, no NVRTC).
pub const BACKEND_UNAVAILABLE: &str = "LC0601";
/// The backend failed while running (a driver error, an internal compile error).
pub const BACKEND_FAILED: &str = "LC0602";
