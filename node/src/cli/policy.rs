//! `weft policy check`: validates a policy file and runs its tests, offline.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;

/// Checks `file`. Warnings and errors go to stderr in `file:line:col:` form
/// (or everything to stdout as JSON); exits 1 when the policy has errors.
pub(super) fn check(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    match weft_policy::check_file(file) {
        Ok(checked) => {
            if json {
                let report = json!({
                    "ok": true,
                    "tests_passed": checked.tests.passed,
                    "warnings": checked.warnings,
                    "errors": [],
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for warning in &checked.warnings {
                    eprintln!("{warning}");
                }
                println!("ok: {} tests passed", checked.tests.passed);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(diagnostics) => {
            if json {
                let report = json!({
                    "ok": false,
                    "tests_passed": 0,
                    "warnings": [],
                    "errors": diagnostics,
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprintln!("{}", diagnostics.to_string().trim_end());
                eprintln!("error: {} has errors", file.display());
            }
            Ok(ExitCode::from(1))
        }
    }
}
