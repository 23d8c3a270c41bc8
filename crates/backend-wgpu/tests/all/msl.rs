//! Every WGSL kernel parses, validates, and translates to Metal Shading Language with
//! naga (what wgpu does on macOS), so the shaders Metal will compile are checked here.
use samepage_backend_wgpu::Kernel;

#[test]
fn every_kernel_translates_to_msl() {
    for (k, cpu) in Kernel::all().into_iter().flat_map(|k| [(k, false), (k, true)]) {
        let src = k.source_for(cpu);
        if cpu && matches!(k, Kernel::Matmul(_)) {
            assert_ne!(src, k.source(), "{}: the CPU tuning was not applied", k.name());
        }
        let module =
            naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{}: {}", k.name(), e.emit_to_string(&src)));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default() | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", k.name(), e.emit_to_string(&src)));
        let options = naga::back::msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        let pipeline = naga::back::msl::PipelineOptions {
            entry_point: Some((naga::ShaderStage::Compute, k.entry().to_string())),
            ..Default::default()
        };
        let (msl, _) = naga::back::msl::write_string(&module, &info, &options, &pipeline)
            .unwrap_or_else(|e| panic!("{}: MSL translation failed: {e}", k.name()));
        assert!(
            msl.contains("kernel void"),
            "{}: no kernel function in the MSL",
            k.name()
        );
    }
}
