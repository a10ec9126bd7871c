-- Argo CD health check for connectors.dev/BitbucketConnector.
-- Suspended: spec.suspend is true. Progressing: no status yet, or the operator
-- has not observed the current generation. Degraded: Stalled=True (kstatus).
-- Healthy: Ready=True. Anything else: Progressing.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Connector is suspended (spec.suspend)"
  return hs
end
if obj.status == nil then
  return hs
end
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local ready = nil
local stalled = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    elseif c.type == "Stalled" then
      stalled = c
    end
  end
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or "Stalled"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
if ready ~= nil then
  hs.message = ready.message or ready.reason or hs.message
end
return hs
