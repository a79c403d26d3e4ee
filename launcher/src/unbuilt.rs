//! TGI's flags for features Sluice has not built: a deployment written for TGI that leaves them
//! at their defaults starts unchanged, and one that asks for more is refused at startup with a
//! message naming the flag, rather than served without what it asked for.

use crate::args::Args;

/// The first flag that asks for something not built, as the message to refuse it with.
pub fn refusal(args: &Args) -> Option<String> {
    let features = &args.unbuilt;
    let text = |value: &dyn ToString| value.to_string();
    // Each flag with the value it asks for, None where it asks for the default.
    let requested: [(&str, Option<String>); 13] = [
        (
            "--quantize",
            args.quantize.filter(|q| !q.is_built()).map(|q| text(&q)),
        ),
        (
            "--speculate",
            features
                .speculate
                .filter(|&tokens| tokens > 0)
                .map(|t| text(&t)),
        ),
        (
            "--cuda-graphs",
            (!features.cuda_graphs.iter().all(|&size| size == 0))
                .then(|| format!("{:?}", features.cuda_graphs)),
        ),
        (
            "--cuda-memory-fraction",
            features
                .cuda_memory_fraction
                .filter(|&f| f != 1.0)
                .map(|f| text(&f)),
        ),
        ("--lora-adapters", features.lora_adapters.clone()),
        ("--rope-scaling", features.rope_scaling.clone()),
        ("--rope-factor", features.rope_factor.map(|f| text(&f))),
        (
            "--watermark-gamma",
            features.watermark_gamma.map(|g| text(&g)),
        ),
        (
            "--watermark-delta",
            features.watermark_delta.map(|d| text(&d)),
        ),
        (
            "--weights-cache-override",
            features.weights_cache_override.clone(),
        ),
        (
            "--tokenizer-config-path",
            features.tokenizer_config_path.clone(),
        ),
        (
            "--validation-workers",
            features
                .validation_workers
                .filter(|&w| w != 2)
                .map(|w| text(&w)),
        ),
        (
            "--prometheus-port",
            features
                .prometheus_port
                .filter(|&port| port != 9000)
                .map(|p| text(&p)),
        ),
    ];
    requested.into_iter().find_map(|(flag, value)| {
        value.map(|value| {
            format!(
                "{flag} {value}: Sluice does not have this feature yet; leave the flag at its \
                 default (docs/launcher.md lists each flag's status)"
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use clap::Parser;

    fn refusal_for(flags: &[&str]) -> Option<String> {
        let argv = std::iter::once("sluice-launcher").chain(flags.iter().copied());
        refusal(&Args::try_parse_from(argv).expect("valid flags"))
    }

    #[test]
    fn defaults_are_accepted() {
        for flags in [
            &[][..],
            &["--speculate", "0"],
            &["--cuda-graphs", "0"],
            &["--cuda-memory-fraction", "1.0"],
            &["--validation-workers", "2"],
            &["--prometheus-port", "9000"],
            &["--disable-grammar-support"],
            &["--quantize", "gguf"],
            &["--quantize", "awq"],
            &["--quantize", "gptq"],
            &["--quantize", "fp8"],
            &["--quantize", "bitsandbytes"],
            &["--quantize", "bitsandbytes-nf4"],
            &["--quantize", "bitsandbytes-fp4"],
            &["--kv-cache-dtype", "fp8_e4m3fn"],
            &["--kv-cache-dtype", "fp8_e5m2"],
        ] {
            assert_eq!(refusal_for(flags), None, "{flags:?}");
        }
    }

    #[test]
    fn anything_else_is_refused_naming_the_flag() {
        for (flags, named) in [
            (&["--quantize", "eetq"][..], "--quantize eetq"),
            (&["--quantize", "marlin"], "--quantize marlin"),
            (&["--speculate", "2"], "--speculate 2"),
            (&["--cuda-graphs", "1,2,4"], "--cuda-graphs"),
            (&["--lora-adapters", "org/adapter"], "--lora-adapters"),
            (&["--validation-workers", "8"], "--validation-workers 8"),
        ] {
            let message = refusal_for(flags).unwrap_or_default();
            assert!(message.starts_with(named), "{flags:?}: {message}");
            assert!(
                message.contains("does not have this feature yet"),
                "{message}"
            );
        }
    }
}
