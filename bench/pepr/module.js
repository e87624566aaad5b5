// A Pepr module doing paddock's DataVolume mutation (Zarf registry rule: pullMethod node).
const { PeprModule, Capability, a } = require("pepr");
const capability = new Capability({ name: "paddock-zarf", description: "DataVolume registry sources pull through the node", namespaces: [] });
capability.When(a.GenericKind, { group: "cdi.kubevirt.io", version: "v1beta1", kind: "DataVolume" })
  .IsCreated()
  .Mutate((request) => {
    const registry = request.Raw.spec && request.Raw.spec.source && request.Raw.spec.source.registry;
    if (registry && typeof registry.url === "string" && registry.url.startsWith("docker://") && registry.pullMethod !== "node") {
      registry.pullMethod = "node";
    }
  });
new PeprModule({ description: "paddock bench", pepr: { uuid: "paddock-bench", onError: "reject", webhookTimeout: 10, alwaysIgnore: { namespaces: [] } } }, [capability]);
