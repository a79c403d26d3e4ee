//! TGI's flags for features Sluice has not built: a deployment written for TGI that leaves them
//! at their defaults starts unchanged, and one that asks for more is refused at startup with a
//! message naming the flag, rather than served without what it asked for.

use crate::args::UnbuiltFeatures;

/// The first flag that asks for something not built, as the message to refuse it with.
pub fn refusal(features: &UnbuiltFeatures) -> Option<String> {
    let asked = |flag: &str, value: String| Some(format!("{flag} {value}"));
    let requested = [
        features
            .quantize
            .as_ref()
            .and_then(|method| asked("--quantize", method.clone())),
        features
            .speculate
            .filter(|&tokens| tokens > 0)
            .and_then(|tokens| asked("--speculate", tokens.to_string())),
        features
            .kv_cache_dtype
            .as_ref()
            .and_then(|dtype| asked("--kv-cache-dtype", dtype.clone())),
        (!features.cuda_graphs.iter().all(|&size| size == 0))
            .then(|| format!("--cuda-graphs {:?}", features.cuda_graphs)),
        features
            .cuda_memory_fraction
            .filter(|&fraction| fraction != 1.0)
            .and_then(|fraction| asked("--cuda-memory-fraction", fraction.to_string())),
        features
            .lora_adapters
            .as_ref()
            .and_then(|adapters| asked("--lora-adapters", adapters.clone())),
        features
            .otlp_endpoint
            .as_ref()
            .and_then(|endpoint| asked("--otlp-endpoint", endpoint.clone())),
        features
            .otlp_service_name
            .as_ref()
            .filter(|name| name.as_str() != "text-generation-inference.router")
            .and_then(|name| asked("--otlp-service-name", name.clone())),
        features
            .rope_scaling
            .as_ref()
            .and_then(|scaling| asked("--rope-scaling", scaling.clone())),
        features
            .rope_factor
            .and_then(|factor| asked("--rope-factor", factor.to_string())),
        features
            .watermark_gamma
            .and_then(|gamma| asked("--watermark-gamma", gamma.to_string())),
        features
            .watermark_delta
            .and_then(|delta| asked("--watermark-delta", delta.to_string())),
        features
            .weights_cache_override
            .as_ref()
            .and_then(|path| asked("--weights-cache-override", path.clone())),
        features
            .tokenizer_config_path
            .as_ref()
            .and_then(|path| asked("--tokenizer-config-path", path.clone())),
        features
            .validation_workers
            .filter(|&workers| workers != 2)
            .and_then(|workers| asked("--validation-workers", workers.to_string())),
        features
            .prometheus_port
            .filter(|&port| port != 9000)
            .and_then(|port| asked("--prometheus-port", port.to_string())),
    ];
    requested.into_iter().flatten().next().map(|flag| {
        format!(
            "{flag}: Sluice does not have this feature yet; leave the flag at its default \
             (docs/launcher.md lists each flag's status)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use clap::Parser;

    fn refusal_for(flags: &[&str]) -> Option<String> {
        let argv = std::iter::once("sluice-launcher").chain(flags.iter().copied());
        refusal(&Args::try_parse_from(argv).expect("valid flags").unbuilt)
    }

    #[test]
    fn defaults_are_accepted() {
        for flags in [
            &[][..],
            &["--speculate", "0"],
            &["--cuda-graphs", "0"],
            &["--cuda-memory-fraction", "1.0"],
            &["--otlp-service-name", "text-generation-inference.router"],
            &["--validation-workers", "2"],
            &["--prometheus-port", "9000"],
            &["--disable-grammar-support"],
        ] {
            assert_eq!(refusal_for(flags), None, "{flags:?}");
        }
    }

    #[test]
    fn anything_else_is_refused_naming_the_flag() {
        for (flags, named) in [
            (&["--quantize", "awq"][..], "--quantize awq"),
            (&["--speculate", "2"], "--speculate 2"),
            (&["--cuda-graphs", "1,2,4"], "--cuda-graphs"),
            (&["--lora-adapters", "org/adapter"], "--lora-adapters"),
            (
                &["--otlp-endpoint", "http://collector:4317"],
                "--otlp-endpoint",
            ),
            (&["--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype"),
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
