-- Argo CD health check for connectors.dev/BitbucketAccessGrant.
-- Healthy: Ready=True, or state Expired (the grant ran its course and was
-- revoked as asked). Degraded: state Failed, Denied (outside the
-- connector's policy; Stalled=True too) or Revoked (its connector was
-- deleted), or Stalled=True. Progressing:
-- anything else, including no status yet and an unobserved generation.
-- A grant is never Suspended.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }
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
local state = obj.status.state
if state == "Failed" or state == "Denied" or state == "Revoked" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  if stalled ~= nil and stalled.status == "True" and stalled.message ~= nil then
    hs.message = stalled.message
  elseif ready ~= nil and ready.message ~= nil then
    hs.message = ready.message
  else
    hs.message = "Grant failed"
  end
  return hs
end
if obj.status.state == "Expired" then
  hs.status = "Healthy"
  hs.message = "Access expired and was revoked"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Granted"
  return hs
end
if ready ~= nil then
  hs.message = ready.message or ready.reason or hs.message
end
return hs
